"""Per-step instrumentation of the training update: the step's metrics row (reward, lengths,
epistemic counts, demonstration share, grader failures) and, per micro-batch, the loss, entropy,
the divergence on epistemic vs other tokens and the split of tokens, gradient and divergence by
token type. The docstrings define each logged quantity.

Infrastructure only (the science is in the experiments, common.py and the worlds)."""
from __future__ import annotations

import numpy as np
import torch

import common
from infra import parallel
from infra.loss_head import to_padded


def step_metrics(r, logs: dict, lr: float) -> dict:
    """The step's training metrics from every rank's rollouts (gathered; r: a step's Rollouts,
    exp02) and the update's logs."""
    samples = [(x.text, len(x.token_ids), x.finish_reason) for x in r.samples]
    parts = parallel.gather_objects((r.rewards, r.has_demo, r.grader.timeouts, r.grader.errors,
                                     samples, r.teacher_cut))
    texts, lengths, reasons = zip(*[x for p in parts for x in p[4]])
    epistemic = common.response_metrics(list(texts), list(lengths), list(reasons))
    demo = [p[1] for p in parts if p[1] is not None]
    return {"train/reward": torch.cat([p[0] for p in parts]).mean().item(),
            "train/response_length": float(np.mean(lengths)),
            "train/truncation_rate": epistemic["truncation_rate"], "train/lr": lr,
            "train/demo_fraction": torch.cat(demo).mean().item() if demo else 0.0,
            "train/teacher_prompt_cut": sum(p[5] for p in parts) / len(texts),  # share cut
            "grader/timeouts": sum(p[2] for p in parts), "grader/errors": sum(p[3] for p in parts),
            **{f"train/{k}": v for k, v in logs.items()},
            **{f"train/{k}": v for k, v in epistemic.items() if k.startswith("epistemic")}}


def token_logs(loss, entropy, mask, div, responses, epistemic_ids, has_demo) -> dict:
    """Loss, mean token entropy and (SDPO) the divergence on epistemic vs other tokens."""
    out = {"loss": loss.item(), "entropy": entropy.mean().item()}
    if div is not None:
        flat = torch.tensor([x for r in responses for x in r], device=mask.device)  # (N,)
        tokens = to_padded(flat, mask)  # (B, T-1) the response token at each scored position
        live = mask & (has_demo[:, None].to(mask.device) > 0)  # (B, T-1)
        epi = epistemic_ids[tokens] & live
        out["sdpo/divergence_epistemic"] = (div[epi].sum().item(), epi.sum().item())
        out["sdpo/divergence_other"] = (div[live & ~epi].sum().item(), (live & ~epi).sum().item())
    return out


def watch_grad_norm(x: torch.Tensor) -> list:
    """A list that backward() fills with ||dL/dx_t|| per row t of x (N, ...) -> (N,): the
    gradient reaching each position's log-probs (SDPO: the distribution, GRPO: the token's)."""
    box = [None]
    if x.requires_grad:
        x.register_hook(lambda g: box.__setitem__(0, g.flatten(1).norm(dim=1) if g.ndim > 1
                                                  else g.abs()))
    return box


def token_type_logs(types, mask, div, grad_norm, names, has_demo) -> dict:
    """Where the update acts, per token type (the world's TOKEN_TYPES; types (N,) indexes them
    for the N response tokens): the share of tokens, the share of the gradient norm
    sum_t ||dL/d log pi_t|| and (SDPO, samples with a demonstration) the teacher–student
    divergence, its mean per token and its share of the total: sum over types = the total.
    (sum, count) pairs, merged over micro-batches and ranks by parallel.merge_logs."""
    out, n = {}, len(types)
    flat_div = None if div is None else div[mask].cpu()  # (N,) in the order of `types`
    live = None if has_demo is None else has_demo.repeat_interleave(mask.sum(1).cpu()) > 0
    grad = None if grad_norm is None else grad_norm.detach().cpu()  # (N,)
    for i, name in enumerate(names):
        of = types == i  # (N,)
        out[f"tokens/{name}/share"] = (of.sum().item(), n)
        if grad is not None:
            out[f"tokens/{name}/grad_share"] = (grad[of].sum().item(), grad.sum().item())
        if flat_div is not None:
            d = flat_div[of & live]
            out[f"sdpo/tokens/{name}/divergence"] = (d.sum().item(), len(d))
            out[f"sdpo/tokens/{name}/divergence_share"] = (d.sum().item(),
                                                           flat_div[live].sum().item())
    return out
