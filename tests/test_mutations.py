"""Tests aimed at single-point mistakes no other test caught (issue 15): each names the mistake it
kills. The SDPO importance weight carries no gradient; a resume restores the torch RNG; update()
weights micro-batches by their size; exp01's D_sg comes from the c = s samples; write_json_atomic
never leaves a half-written file."""
import json
from dataclasses import replace

import pytest
import torch

import common
import exp01_offpolicy as e1
import exp02_onpolicy_grpo_sdpo as e2
import toy_world
from infra import checkpoints
from infra.rollout import Sample
from tiny import tiny_random_model


def test_sdpo_importance_weight_is_detached():
    """Mistake: min(pi_theta/pi_old, is_clip) left attached, so the loss would also push the
    sampled token's log-prob. Only the divergence may carry gradient."""
    torch.manual_seed(0)
    B, T, K = 2, 3, 4
    logits = torch.randn(B, T, K + 1, requires_grad=True)
    student = logits.log_softmax(-1)[..., :K]  # top-k log-probs: mass < 1, a tail bin is left
    teacher = torch.randn(B, T, K + 1).log_softmax(-1)[..., :K]
    logp = torch.full((B, T), -1.0, requires_grad=True)
    old = torch.full((B, T), -1.2)  # ratio e^0.2 = 1.22: below the clip, so not flat there
    loss, _ = e2.sdpo_loss(student, teacher, logp, old, torch.ones(B, T), torch.ones(B))
    loss.backward()
    assert logits.grad.abs().sum() > 0
    assert logp.grad is None or torch.count_nonzero(logp.grad) == 0


def test_resume_restores_the_torch_rng(tmp_path):
    """Mistake: a resume that restores weights, optimizer and scheduler but not the torch RNG
    state, so a resumed run samples a different stream from an uninterrupted one."""
    model = tiny_random_model()[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    torch.manual_seed(123)
    checkpoints.save_state(tmp_path, 1, model, opt, sched, [], keep=1)
    expected = torch.rand(5)
    torch.manual_seed(999)
    assert checkpoints.load_state(tmp_path, model, opt, sched, None, []) == 1
    assert torch.equal(torch.rand(5), expected)


def test_update_weights_uneven_micro_batches_by_their_size():
    """Mistake: averaging micro-batch losses equally. A mini-batch of 4 sequences split 3 + 1 must
    give the gradient of the same 4 in one micro-batch (per-sequence mean over the mini-batch)."""
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(3, 250, (3 + i,), generator=g).tolist(),
             torch.randint(3, 250, (2 + 2 * i,), generator=g).tolist()) for i in range(4)]
    rollouts = e2.Rollouts(samples=[Sample(r, "", "stop") for _, r in seqs],
                           rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]), grader=common.GradeReport(correct=[]),
                           seqs=seqs)
    s = e2.Settings(method="grpo", rollouts=4, prompts_per_step=1, mini_batches=1, grad_clip=1e9,
                    logit_chunk=64)
    weights = []
    for micro in (4, 3):  # one micro-batch; then 3 + 1
        model, tok = tiny_random_model()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # new weights = old - gradient
        e2.update(replace(s, micro_batch_size=micro), student=model, teacher=None, opt=opt, rollouts=rollouts,
                  pad_id=tok.pad_token_id, epistemic_ids=torch.zeros(len(tok), dtype=torch.bool), step=1)
        weights.append([p.detach().clone() for p in model.parameters()])
    base = [p.detach() for p in tiny_random_model()[0].parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(weights[0], base))
    assert moved > 1e-4, "the update did not move the weights: the comparison would prove nothing"
    for one, split in zip(*weights):
        assert torch.allclose(one, split, atol=1e-6, rtol=1e-4)


def test_exp01_sft_sets_take_d_sg_from_the_c_eq_s_samples():
    """Mistake: D_sg built from the c = s\\think (or any other) context's samples. D_ug = the first
    correct unguided response, D_sg = the first correct c = s response; prompts carry no hint."""
    tok = toy_world.build_tokenizer()
    preset = {"thinking": True}

    def row(ids, correct):
        return {"ids": ids, "text": "", "finish": "stop", "correct": correct}

    questions = [{"prompt": "edges n1 n2 start n1 target n2", "gold": "n2"},
                 {"prompt": "edges n3 n4 start n3 target n4", "gold": "n4"}]
    groups = {"none": [[row([1], False), row([2], True)], [row([3], True)]],
              "s": [[row([4], True)], [row([5], False), row([6], True)]],
              "s_nothink": [[row([7], True)], [row([8], True)]],
              "regenerated": [[row([9], True)], [row([10], True)]]}
    data = e1.sft_sets(questions, groups, tok, preset)
    assert [r for _, r in data["D_ug"]] == [[2], [3]]
    assert [r for _, r in data["D_sg"]] == [[4], [6]]
    assert [p for p, _ in data["D_sg"]] == [common.prompt_ids(tok, q["prompt"], True) for q in questions]


def test_write_json_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    """Mistake: writing in place. A crash mid-write must leave the old file whole, never a new
    half-written one."""
    path = tmp_path / "final.json"
    common.write_json_atomic(path, {"old": 1})

    def crash(fd):
        raise OSError("the disk died mid-write")

    monkeypatch.setattr(common.os, "fsync", crash)
    with pytest.raises(OSError, match="mid-write"):
        common.write_json_atomic(path, {"new": 2, "long": "x" * 100_000})
    assert json.loads(path.read_text()) == {"old": 1}
