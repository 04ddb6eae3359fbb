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
    ids, att, lab = loss_head.pack_sequences(rollouts.seqs, tok.pad_token_id)
    want = loss_head.token_stats(before, ids, att, lab, None, 16, grad=False)[0]  # (N_tok,)
    logprobs = torch.tensor([p for x in rollouts.samples for p in x.logprobs])  # (N_tok,)
    got_old = torch.cat([old[mask] for old, _, mask in seen])  # (N_tok,)
    got_weight = torch.cat([w[mask] for _, w, mask in seen])  # (N_tok,)
    assert torch.allclose(got_old, want, atol=1e-6)
    assert torch.allclose(got_weight, (want - logprobs).exp().clamp(max=s.rollout_is_clip),
                          atol=1e-6)
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(),
                                                              before.parameters()))
    assert moved > 1e-4, "the step did not move the weights"
