"""The update's savings change no value: pi_old of the first mini-batch taken from its own
student forward equals a separate no-grad forward before the step (and so do the rollout
correction, the losses and the new weights)."""
import copy
import inspect
from dataclasses import replace

import pytest
import torch

import common
import exp02_onpolicy_grpo_sdpo as e
from infra import loss_head
from infra.rollout import Sample
from tiny import tiny_random_model

G, N = 3, 4  # groups (prompts), rollouts per group


def grouped_rollouts(with_logprobs: bool) -> e.Rollouts:
    """G groups of N samples sharing their prompt (unequal prompt lengths across groups), unequal
    response lengths, a teacher prompt shared by most of a group (its first success's) and one
    of its own, and rollout-engine log-probs (as from vLLM) when asked."""
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 250, (n,), generator=g).tolist()  # noqa: E731
    seqs, teacher_seqs, samples = [], [], []
    for i in range(G):
        prompt, demo, other = rand(5 + 3 * i), rand(9 + i), rand(7)
        for j in range(N):
            response = rand(2 + (5 * j + i) % 7)
            seqs.append((prompt, response))
            teacher_seqs.append((other if j == 0 else demo, response))
            logprobs = (-2.0 + 0.3 * torch.randn(len(response), generator=g)).tolist()
            samples.append(Sample(response, "", "stop", logprobs if with_logprobs else None))
    rewards = torch.tensor([float((3 * i) % 5 < 2) for i in range(G * N)])
    return e.Rollouts(samples=samples, rewards=rewards, grader=common.GradeReport(correct=[]),
                      seqs=seqs, teacher_seqs=teacher_seqs, has_demo=torch.ones(G * N))


@pytest.mark.parametrize("method", ["grpo", "sdpo"])
def test_first_mini_batch_pi_old_equals_a_separate_forward_before_the_step(method, monkeypatch):
    """Every sequence's pi_old (log-probs) and rollout correction that reach the loss equal those of
    a separate no-grad forward with the weights before the step, to round-off."""
    torch.manual_seed(0)
    model, tok = tiny_random_model()
    before = copy.deepcopy(model)
    rollouts = grouped_rollouts(with_logprobs=True)
    s = e.Settings(method=method, rollouts=N, prompts_per_step=G, mini_batches=2,
                   micro_batch_size=4, topk=8, logit_chunk=16, lr=1e-2)
    seen = []  # (old_logp, rollout_weight, mask) of each micro-batch, in order
    for name in ("grpo_loss", "sdpo_loss"):
        real = getattr(e, name)

        def spy(*args, real=real, **kwargs):
            a = inspect.signature(real).bind(*args, **kwargs).arguments
            seen.append((a["old_logp"].detach().clone(), a["rollout_weight"], a["mask"] > 0))
            return real(*args, **kwargs)

        monkeypatch.setattr(e, name, spy)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr)
    e.update(s, student=model, teacher=copy.deepcopy(before).eval() if method == "sdpo" else None,
             opt=opt, rollouts=rollouts, pad_id=tok.pad_token_id,
             epistemic_ids=torch.zeros(len(tok), dtype=torch.bool), step=1)
    assert len(seen) == 4  # micro-batches of 4 + 2 in each mini-batch of 6
    want = loss_head.token_stats(before, rollouts.seqs, tok.pad_token_id, None, 16,
                                 grad=False)[0]  # (N_tok,)
    logprobs = torch.tensor([p for x in rollouts.samples for p in x.logprobs])  # (N_tok,)
    got_old = torch.cat([old[mask] for old, _, mask in seen])  # (N_tok,)
    got_weight = torch.cat([w[mask] for _, w, mask in seen])  # (N_tok,)
    assert torch.allclose(got_old, want, atol=1e-6)
    assert torch.allclose(got_weight, (want - logprobs).exp().clamp(max=s.rollout_is_clip),
                          atol=1e-6)
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(),
                                                              before.parameters()))
    assert moved > 1e-4, "the step did not move the weights"


def grouped_pairs() -> list[tuple[list[int], list[int]]]:
    """Groups sharing a prompt, of unequal prompt lengths (as teacher prompts are), unequal
    response lengths, and one sequence whose prompt nobody shares."""
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(3, 250, (n,), generator=g).tolist()  # noqa: E731
    pairs = [(prompt, rand(2 + (3 * j + i) % 6)) for i, prompt in enumerate([rand(5), rand(12),
                                                                              rand(8)])
             for j in range(4)]
    return pairs[:6] + [(rand(20), rand(3))] + pairs[6:]


def stats(model, pairs, share: bool, monkeypatch, k=5, grad=True):
    """token_stats on the shared-prefix path (share) or the plain one -> outputs, gradients."""
    monkeypatch.setattr(loss_head, "prefix_sharing_pays", lambda *args: share)
    model.zero_grad()
    out = loss_head.token_stats(model, pairs, 0, k, chunk=7, grad=grad)
    if not grad:
        return out, []
    w = torch.linspace(-1, 1, out[1].numel()).view(out[1].shape)  # (N, K)
    ((out[0] * torch.linspace(0, 2, len(out[0]))).sum() + (out[1].exp() * w).sum()).backward()
    return out, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("k,grad,cost", [(None, True, 32), (0, True, 32), (5, True, 32),
                                         (5, False, 32), (5, True, 0), (5, False, 0)])
def test_shared_prefix_forward_equals_the_plain_forward(k, grad, cost, monkeypatch):
    """Each distinct prefix forwarded once, its K/V expanded to the sequences that share it, the
    suffixes in one forward or (cost 0) one per response length: the same token log-probs,
    top-k / full distributions, entropy, ids and mask as the plain packed forward, and the same
    parameter gradients (to 1e-6 of their scale)."""
    monkeypatch.setattr(loss_head, "BUCKET_COST", cost)
    forwards = []
    real = loss_head.last_hidden_state
    monkeypatch.setattr(loss_head, "last_hidden_state",
                        lambda *a, **kw: forwards.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    model, _ = tiny_random_model()
    pairs = grouped_pairs()
    assert loss_head.prefix_sharing_pays(model, pairs, grad)  # what token_stats would choose
    (plain, g_plain), (shared, g_shared) = (stats(model, pairs, share, monkeypatch, k, grad)
                                            for share in (False, True))
    for a, b in zip(plain[:3], shared[:3]):  # log-probs, distributions, entropy
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=1e-6)
    assert (plain[3] is None and shared[3] is None) or torch.equal(plain[3], shared[3])
    assert torch.equal(plain[4], shared[4])
    scale = max(g.abs().max().item() for g in g_plain) if grad else 0
    assert not grad or scale > 0.1
    for a, b in zip(g_plain, g_shared):
        assert torch.allclose(a, b, atol=1e-6 * scale)
    lengths = {len(r) for _, r in pairs}
    assert len(forwards) == 1 + (1 if cost else len(lengths))  # plain, then the suffix buckets


def test_buckets_cut_padding_and_cover_every_sequence_once():
    """Sorted runs that cover every index once; a few long responses get their own forward
    (less padding than one batch), a forward's cost keeps near-equal lengths together."""
    lengths = [12] * 24 + [19] * 17 + [25] * 20 + [30, 30, 47]
    runs = loss_head.buckets(lengths, 32)
    assert sorted(i for r in runs for i in r) == list(range(len(lengths)))
    longest = [max(lengths[i] for i in r) for r in runs]
    assert longest == sorted(longest) and len(runs) > 1
    padded = sum(len(r) * m for r, m in zip(runs, longest))
    assert padded + 32 * len(runs) < len(lengths) * 47 + 32
    assert loss_head.buckets([5, 6, 5, 6], 32) == [[0, 2, 1, 3]]  # not worth a second forward
    assert loss_head.buckets([5, 6, 5, 6], 0) == [[0, 2], [1, 3]]


def test_prefix_sharing_forwards_fewer_positions_and_falls_back_where_the_cache_is_dropped(
        monkeypatch):
    """The shared path forwards U * Lp + B * Ls positions instead of B * T; under gradient
    checkpointing in training (transformers drops the cache) the plain path runs, in eval
    mode the shared one, and both give the plain values."""
    torch.manual_seed(0)
    model, _ = tiny_random_model()
    pairs = grouped_pairs()
    seen = []
    model.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True)
    want = loss_head.token_stats(model, pairs, 0, 5, 7, grad=False)
    T = max(len(p) + len(r) for p, r in pairs)
    U_Lp, B_Ls = 4 * 19, len(pairs) * (1 + 7)  # 4 distinct prefixes (<= 19 tokens), <= 7 + 1
    assert seen == [U_Lp, B_Ls] and U_Lp + B_Ls < len(pairs) * T
    model.gradient_checkpointing_enable({"use_reentrant": False})
    for train, shares in ((True, False), (False, True)):
        model.train(train)
        seen.clear()
        assert loss_head.prefix_sharing_pays(model, pairs, True) == shares
        got = loss_head.token_stats(model, pairs, 0, 5, 7)
        assert len(seen) == (2 if shares else 1)
        assert torch.allclose(got[0], want[0], atol=1e-6) and torch.equal(got[3], want[3])


@pytest.mark.parametrize("method", ["grpo", "sdpo"])
def test_update_with_shared_prefixes_equals_the_plain_update(method, monkeypatch):
    """A whole update() (pi_old, student and teacher forwards) with shared prefixes moves the
    weights as the plain forwards do (SGD: the new weights differ by lr x the gradients')."""
    rollouts = grouped_rollouts(with_logprobs=True)
    s = e.Settings(method=method, rollouts=N, prompts_per_step=G, mini_batches=2,
                   micro_batch_size=6, topk=8, logit_chunk=16)
    weights, logs, calls = [], [], []
    real = loss_head.shared_prefix_hidden
    for share in (False, True):
        if not share:
            monkeypatch.setattr(loss_head, "prefix_sharing_pays", lambda *args: False)
        else:
            monkeypatch.undo()
            monkeypatch.setattr(loss_head, "shared_prefix_hidden",
                                lambda *args: calls.append(1) or real(*args))
        torch.manual_seed(0)
        model, tok = tiny_random_model()
        teacher = copy.deepcopy(model).eval() if method == "sdpo" else None
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        epistemic_ids = torch.arange(len(tok)) % 7 == 0  # (V,) some tokens count as epistemic
        logs.append(e.update(s, student=model, teacher=teacher, opt=opt, rollouts=rollouts,
                             pad_id=tok.pad_token_id, epistemic_ids=epistemic_ids, step=1))
        weights.append([p.detach().clone() for p in model.parameters()])
    assert len(calls) == (5 if method == "sdpo" else 3)  # pi_old 1, student 2 (, teacher 2)
    assert logs[0].keys() == logs[1].keys()
    for key in logs[0]:
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-5, abs=1e-7), key
    for a, b in zip(*weights):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_base_evaluation_is_made_once_per_process_with_the_same_values(tmp_path, monkeypatch):
    """Step 0's evaluation of --model is reused by the process's later runs with the same sets and
    sampling (greedy: whatever the seed or method), equal to a fresh evaluation; other sampling,
    and any evaluation after step 0, evaluate again."""
    from infra import parallel
    from infra.rollout import make_generator

    world = common.pick_world("toy")
    s = e.resolve(e.Settings(method="grpo", eval_n=6, probe_n=0, threads=1), world)
    model, tok, preset = common.load_model(s.model, device="cpu", dtype=torch.float32)
    sets = world.evaluation_sets(s.eval_n, train_graphs=True)
    generator = parallel.ShardedGenerator(make_generator(model, tok, "hf"))
    calls, real = [], common.evaluate_sets
    monkeypatch.setattr(common, "evaluate_sets", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(e, "BASE_EVALUATIONS", {})

    def evaluate(settings, base=True):
        return e.evaluate(settings, world, preset, model, tok, generator, sets, tmp_path, base=base)

    first = evaluate(s)
    assert evaluate(replace(s, seed=3, method="sdpo")) == first and len(calls) == 1  # reused
    assert evaluate(s, base=False) == first and len(calls) == 2  # a fresh evaluation: equal
    evaluate(replace(s, max_new_tokens=8))  # other sampling: evaluated again
    assert len(calls) == 3
