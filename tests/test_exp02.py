"""exp02: the two losses against hand-computed values, the teacher context builder, the EMA
teacher, chunked token statistics, one real SDPO update, and a subprocess smoke run."""
import json
import math
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import common
from infra import loss_head, step_logs  # noqa: E402
import tiny  # noqa: E402
from tiny import TINY  # noqa: E402
import exp02_onpolicy_grpo_sdpo as e

ROOT = Path(__file__).resolve().parents[1]


def test_group_advantages_subtract_the_mean_without_std():
    adv = e.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]))


def test_grpo_loss_hand_computed():
    # seq 0: A = +1, ratios 1.5 (clipped to 1.28) and 0.5 (not clipped: min of the two objectives)
    # seq 1: A = -1, ratios 4 (dual clip caps the loss at 3) and 0.5 (clip to 0.8 is the max)
    ratios = torch.tensor([[1.5, 0.5], [4.0, 0.5]])
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss = e.grpo_loss(ratios.log(), old, adv, mask)
    assert loss.item() == pytest.approx(((-1.28 - 0.5) / 2 + (3.0 + 0.8) / 2) / 2)
    mask[1, 1] = 0  # per sequence: mean over its own tokens, then over sequences
    assert e.grpo_loss(ratios.log(), old, adv, mask).item() == pytest.approx(((-1.28 - 0.5) / 2 + 3.0) / 2)
    weight = torch.tensor([[0.5, 1.0], [1.0, 1.0]])  # rollout correction multiplies the token loss
    assert e.grpo_loss(ratios.log(), old, adv, mask, weight).item() == pytest.approx(((-0.64 - 0.5) / 2 + 3.0) / 2)


def kl(p, q):
    return float(np.sum(p * np.log(p / q)))


def test_generalized_jsd_limits_and_midpoint():
    S, T = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.6, 0.3])
    s, t = torch.tensor(S).log(), torch.tensor(T).log()
    assert e.generalized_jsd(s, t, 0.0).item() == pytest.approx(kl(T, S))  # forward KL(teacher||student)
    assert e.generalized_jsd(s, t, 1.0).item() == pytest.approx(kl(S, T))  # reverse KL(student||teacher)
    M = 0.5 * S + 0.5 * T
    assert e.generalized_jsd(s, t, 0.5).item() == pytest.approx(0.5 * kl(S, M) + 0.5 * kl(T, M))
    M = 0.75 * S + 0.25 * T
    assert e.generalized_jsd(s, t, 0.25).item() == pytest.approx(0.75 * kl(S, M) + 0.25 * kl(T, M))


def test_tail_bin_holds_the_missing_mass():
    p = torch.tensor([0.5, 0.2])
    assert torch.allclose(e.with_tail(p.log()).exp(), torch.tensor([0.5, 0.2, 0.3]))


def test_sdpo_topk_equal_to_vocabulary_without_tail_is_the_full_divergence():
    torch.manual_seed(0)
    s_logp = torch.randn(2, 5, 11).log_softmax(-1)
    t_logp = torch.randn(2, 5, 11).log_softmax(-1)
    ids = s_logp.topk(11, dim=-1).indices
    mask, demo, zero = torch.ones(2, 5), torch.ones(2), torch.zeros(2, 5)
    full, _ = e.sdpo_loss(s_logp, t_logp, zero, zero, mask, demo, add_tail=False)
    topk, _ = e.sdpo_loss(s_logp.gather(-1, ids), t_logp.gather(-1, ids), zero, zero, mask, demo, add_tail=False)
    assert topk.item() == pytest.approx(full.item(), rel=1e-5)
    small, _ = e.sdpo_loss(s_logp.gather(-1, ids[..., :4]), t_logp.gather(-1, ids[..., :4]), zero, zero, mask, demo)
    assert small.item() != pytest.approx(full.item(), rel=1e-3)  # top-4 + tail is a coarser divergence


def test_sdpo_zero_when_student_equals_teacher_and_masking_rules():
    torch.manual_seed(1)
    s_logp = torch.randn(2, 3, 7).log_softmax(-1)
    mask, zero = torch.ones(2, 3), torch.zeros(2, 3)
    loss, div = e.sdpo_loss(s_logp, s_logp.clone(), zero, zero, mask, torch.ones(2), add_tail=False)
    assert loss.item() == pytest.approx(0.0, abs=1e-7) and div.abs().max() < 1e-6
    t_logp = torch.randn(2, 3, 7).log_softmax(-1)
    _, div = e.sdpo_loss(s_logp, t_logp, zero, zero, mask, torch.ones(2), add_tail=False)
    per_seq = div.mean(1)
    demo = torch.tensor([1.0, 0.0])
    counted, _ = e.sdpo_loss(s_logp, t_logp, zero, zero, mask, demo, add_tail=False)
    assert counted.item() == pytest.approx(per_seq[0].item() / 2)  # no-demo sample counts in the mean
    kept, _ = e.sdpo_loss(s_logp, t_logp, zero, zero, mask, demo, add_tail=False, count_no_demo=False)
    assert kept.item() == pytest.approx(per_seq[0].item())
    logp = torch.full((2, 3), math.log(3.0))  # pi_theta / pi_old = 3 -> weight clipped to 2
    clipped, _ = e.sdpo_loss(s_logp, t_logp, logp, zero, mask, torch.ones(2), add_tail=False)
    assert clipped.item() == pytest.approx(2 * per_seq.mean().item(), rel=1e-5)


def test_teacher_context_never_uses_own_response_and_strips_thinking():
    responses = ["<think>a</think>\n\nA", "<think>b</think>\n\nB", "<think>c</think>\n\nC",
                 "<think>d</think>\n\nD", "<think>e</think>\n\nE", "<think>f</think>\n\nF"]
    rewards = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    msgs = e.teacher_messages(["Q1", "Q2"], responses, rewards, n=3, context="s", think_in_prompt=False)
    assert msgs[0] == common.teacher_message("Q1", responses[2])  # own success skipped, next peer
    assert msgs[1] == msgs[2 - 1] and msgs[1] == common.teacher_message("Q1", responses[0])  # first in batch order
    assert msgs[2] == common.teacher_message("Q1", responses[0])
    assert msgs[3] == msgs[4] == common.teacher_message("Q2", responses[5])
    assert msgs[5] is None  # the only success in its group is its own
    nothink = e.teacher_messages(["Q1", "Q2"], responses, rewards, n=3, context="s_nothink", think_in_prompt=False)
    assert nothink[0] == common.teacher_message("Q1", "C")
    r1 = ["step one\nwait</think>\n\nX", "y</think>\n\nY"]  # DeepSeek form: <think> opened in the prompt
    ds = e.teacher_messages(["Q"], r1, [1.0, 1.0], n=2, context="s_nothink", think_in_prompt=True)
    assert ds == [common.teacher_message("Q", "Y"), common.teacher_message("Q", "X")]
    with pytest.raises(ValueError, match="s_nothink"):
        e.teacher_messages(["Q"], r1, [1.0, 1.0], n=2, context="think", think_in_prompt=True)


def test_ema_rate_zero_leaves_teacher_bit_identical():
    student, _, _ = common.load_model(TINY)
    teacher = tiny.tiny_random_model(seed=1)[0]
    before = [p.detach().clone() for p in teacher.parameters()]
    shadow = [p.detach().float().clone() for p in teacher.parameters()]
    e.ema_update(shadow, teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    e.ema_update(shadow, teacher, student, 0.25)
    for b, pt, ps in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(pt, 0.75 * b + 0.25 * ps, atol=1e-6)


def test_chunked_token_stats_equal_unchunked_with_gradients():
    model, tok, _ = common.load_model(TINY)
    pairs = [([1, 2, 3], [4, 5, 6, 7]), ([8], [9, 10])]
    ids, att, lab = loss_head.pack_sequences(pairs, tok.pad_token_id)
    results = []
    for chunk in (2, 1000):
        model.zero_grad()
        t, d, ent, top, mask = loss_head.token_stats(model, pairs, tok.pad_token_id, 5, chunk)
        (t.sum() + d.exp().sum()).backward()
        results.append((t.detach(), d.detach(), top, model.model.embed_tokens.weight.grad.clone()))
    (t1, d1, i1, g1), (t2, d2, i2, g2) = results
    assert t1.shape == (6,) and d1.shape == (6, 5)
    assert torch.allclose(t1, t2, atol=1e-6) and torch.allclose(d1, d2, atol=1e-6) and torch.equal(i1, i2)
    assert torch.allclose(g1, g2, atol=1e-5)  # fp32 sums in another order (gradients up to ~4)
    full = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)[mask]
    assert torch.allclose(t1, full.gather(-1, lab[:, 1:][mask][:, None])[:, 0], atol=1e-5)


def write_paper_parquet(path, questions):
    """Tiny files in the paper's nested verl layout."""
    pd.DataFrame({"data_source": ["test"] * len(questions),
                  "prompt": [[{"role": "user", "content": q}] for q, _ in questions],
                  "ability": ["math"] * len(questions),
                  "reward_model": [{"ground_truth": a, "style": "rule"} for _, a in questions],
                  "extra_info": [{"index": i} for i in range(len(questions))]}).to_parquet(path)


@pytest.fixture
def tiny_data(tmp_path):
    write_paper_parquet(tmp_path / "train.parquet", [("What is 1+1?", "2"), ("What is 2+3?", "5")])
    for name in ("aime24", "amc23"):
        write_paper_parquet(tmp_path / f"{name}.parquet", [("What is 3+3?", "6")])
    return tmp_path


def test_one_sdpo_step_uses_the_teacher(tiny_data, half_right_grading):
    """With half the rollouts graded correct, every sample has a peer demonstration, the SDPO
    loss is positive, the student moves and the frozen teacher does not."""
    s = e.Settings(model=TINY, steps=1, prompts_per_step=2, rollouts=4, max_new_tokens=8, eval_k=1,
                   train_file=str(tiny_data / "train.parquet"), data_dir=str(tiny_data), topk=20,
                   out_dir=str(tiny_data / "run"), threads=1, micro_batch_size=3)
    final = e.train_arm(replace(s, method="sdpo", teacher_context="s"), str(tiny_data / "run"))
    row = final["final"]
    assert row["train/demo_fraction"] == 1.0 and row["train/reward"] == 0.5
    assert row["train/loss"] > 0 and row["train/grad_norm"] > 0
    assert math.isfinite(row["train/sdpo/divergence_other"])


@pytest.mark.parametrize("method", ["grpo", "sdpo"])
def test_smoke_subprocess_math_code_path(tiny_data, method):
    out = tiny_data / f"out_{method}"
    cmd = [sys.executable, str(ROOT / "exp02_onpolicy_grpo_sdpo.py"), "--model", TINY, "--method", method,
           "--steps", "2", "--prompts-per-step", "2", "--rollouts", "2", "--max-new-tokens", "8", "--eval-k", "1",
           "--train-file", str(tiny_data / "train.parquet"), "--data-dir", str(tiny_data), "--out-dir", str(out),
           "--threads", "1", "--topk", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arm = "grpo" if method == "grpo" else "sdpo_s"
    run = out / arm / "seed0"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "final.json", "samples"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    for key in ("train/reward", "train/response_length", "train/epistemic/wait", "train/demo_fraction",
                "train/loss", "train/grad_norm", "train/lr", "train/entropy", "eval/aime24/avg@1", "eval/amc23/avg@1"):
        assert key in lines[-1], key
    final = json.loads((run / "final.json").read_text())
    assert final["method"] == method and final["steps"] == 2
    assert [r["arm"] for r in json.loads((out / "summary.json").read_text())] == ["base (step 0)", arm]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a finished run is never overwritten
    assert again.returncode != 0 and "--overwrite" in again.stderr


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while `fn` runs (CPU has no allocator stats)."""
    storages = {}

    def pack(t):  # count each storage once: the weight saved by every chunk is one tensor
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_chunked_stats_keep_no_positions_by_vocab_tensor_for_backward():
    """The chunked loss head equals the unchunked one (values and gradients), and what autograd
    keeps for it is exactly the stated bound, whatever the chunk size:

        kept = V*H*4 (head weight) + N*H*4 (hidden states) + N*(4K + 8) bytes,

    i.e. O(N x (H + K)), never the O(N x V) of one fp32 logits tensor. At N = 20,480 response
    tokens, K = 100 that is 8.4 MB beyond the weight and the hidden states the model holds anyway;
    the transient peak is a few (chunk x V) buffers per chunk (README "Benchmarks")."""
    torch.manual_seed(0)
    N, H, V, K = 512, 32, 4096, 8
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (N,))

    def head(chunk):
        outs = [torch.utils.checkpoint.checkpoint(loss_head._chunk_stats, hidden[a:a + chunk], weight, targets[a:a + chunk], K,
                                                  None, use_reentrant=False) for a in range(0, N, chunk)]
        return torch.cat([o[0] for o in outs]).sum() + torch.cat([o[1] for o in outs]).exp().sum()

    grads, kept_by_chunk = [], []
    for chunk in (64, 100, N):  # 100: a last chunk shorter than the others
        hidden.grad = weight.grad = None
        loss, kept = saved_bytes(lambda: head(chunk))
        loss.backward()
        grads.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
        kept_by_chunk.append(kept)
    for loss, g_hidden, g_weight in grads[:2]:  # chunked == one chunk holding every position
        assert torch.allclose(loss, grads[-1][0], rtol=1e-6)
        assert torch.allclose(g_hidden, grads[-1][1], atol=1e-5) and torch.allclose(g_weight, grads[-1][2], atol=1e-5)
    bound = V * H * 4 + N * H * 4 + N * (4 * K + 8)
    assert kept_by_chunk == [bound] * 3, (kept_by_chunk, bound)
    (_, kept_unchunked_without_checkpoint) = saved_bytes(
        lambda: loss_head._chunk_stats(hidden, weight, targets, K, None)[0].sum())
    assert kept_unchunked_without_checkpoint >= N * V * 4  # the naive path keeps (N x V)


def test_token_type_split_sums_to_the_total_divergence_and_gradient():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)  # (B, T)
    div = torch.rand(3, 4) * mask  # (B, T)
    types = torch.tensor([0, 1, 2, 2, 0, 1, 3, 2, 2])  # (N,) N = 9 response tokens
    grad = torch.rand(9)
    has_demo = torch.tensor([1.0, 0.0, 1.0])  # the middle sample has no demonstration
    logs = step_logs.token_type_logs(types, mask, div, grad, ("a", "b", "c", "d"), has_demo)
    live_total = div[0].sum() + div[2].sum()
    parts = [logs[f"sdpo/tokens/{n}/divergence"][0] for n in "abcd"]
    assert sum(parts) == pytest.approx(live_total.item())
    assert logs["sdpo/tokens/d/divergence"] == (0.0, 0)  # type d is only in the no-demo sample
    assert sum(logs[f"sdpo/tokens/{n}/divergence_share"][0] for n in "abcd") == pytest.approx(
        logs["sdpo/tokens/a/divergence_share"][1])
    assert sum(logs[f"tokens/{n}/grad_share"][0] for n in "abcd") == pytest.approx(grad.sum())
    assert sum(logs[f"tokens/{n}/share"][0] for n in "abcd") == 9
    merged = e.parallel.merge_logs([logs, logs])  # micro-batches: sums over both, then ratios
    assert sum(merged[f"sdpo/tokens/{n}/divergence_share"] for n in "abcd") == pytest.approx(1)


def test_watch_grad_norm_reads_the_gradient_per_position():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    box = step_logs.watch_grad_norm(x)
    (x * torch.tensor([[3.0, 4.0], [0.0, 1.0]])).sum().backward()
    assert box[0].tolist() == pytest.approx([5.0, 1.0])
    assert step_logs.watch_grad_norm(torch.ones(2)) == [None]  # no gradient: nothing to watch
