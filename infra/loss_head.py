"""The training step's plumbing: packing (prompt, response) pairs, the chunked log-prob /
top-k head (no positions x vocabulary tensor kept), and a plain next-token step.

Infrastructure only (the science is in the experiments, common.py and the worlds)."""
from __future__ import annotations

import torch
import torch.utils.checkpoint

from infra import parallel


def pack_sequences(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """[(prompt_ids, response_ids)] -> right-padded input_ids, attention_mask and labels that are
    -100 except on response tokens (the loss is on the response only)."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad_id)  # (B, T)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(pairs), width), -100)  # (B, T)
    for i, (p, r) in enumerate(pairs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(p) + len(r)] = 1
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
    return ids, mask, labels


def lm_step(
    model, opt, pairs: list[tuple[list[int], list[int]]], pad_id: int, grad_clip: float = 1.0
) -> float:
    """One optimizer step of supervised next-token learning on [(prompt ids, response ids)]:
    cross-entropy on the response tokens only, averaged over all response tokens of the batch
    (pretraining of the toy model and the SFT of exp01)."""
    device = next(model.parameters()).device
    ids, mask, labels = (t.to(device) for t in pack_sequences(pairs, pad_id))  # (B, T) each
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


def _chunk_stats(h, weight, targets, k, ids):
    logp = torch.log_softmax((h @ weight.T).float(), dim=-1)  # (C, V)
    tok = logp.gather(-1, targets[:, None])[:, 0]  # (C,)
    entropy = -(logp.exp() * logp).sum(-1).detach()  # (C,)
    if k is None:  # token log-probs only
        return tok, tok.new_zeros(len(tok), 0), entropy, None
    if k == 0:  # the full vocabulary
        return tok, logp, entropy, None
    ids = logp.topk(k, dim=-1).indices if ids is None else ids  # (C, K) the student's top-k ids
    return tok, logp.gather(-1, ids), entropy, ids


def last_hidden_state(model, input_ids, attention_mask) -> torch.Tensor:
    """The decoder's final-norm hidden states (B, T, H). The root forward runs (not model.model
    alone) so that FSDP gathers the root's weights (embeddings, norm, head), with logits of the
    last position only; a hook on the decoder takes its output, so no layer's states are kept
    beyond the last (output_hidden_states would keep all of them: ~6.5 GB per 21.5k-token
    sequence at 8B in the teacher's no-grad forward)."""
    box = []

    def take(module, args, out):
        box.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

    handle = model.model.register_forward_hook(take)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return box[0]


def token_stats(
    model,
    input_ids,
    attention_mask,
    labels,
    k: int | None,
    chunk: int,
    topk_ids=None,
    grad: bool = True,
):
    """For the N response tokens (row-major): log-prob of each token, the distribution over the
    top-k ids (the student's own when topk_ids is None, else the given ids; k = 0: the full
    vocabulary; k = None: none), entropy, the ids, and the (B, T-1) mask of response positions.
    With grad, each chunk is recomputed in backward (checkpoint), so only (N, K) is kept."""
    targets = labels[:, 1:]  # (B, T-1) position p predicts token p+1
    mask = targets != -100  # (B, T-1)
    with torch.set_grad_enabled(grad), parallel.bf16_compute(input_ids.device):
        hidden = last_hidden_state(model, input_ids, attention_mask)[:, :-1][mask]  # (N, H)
        weight, tgt = model.get_output_embeddings().weight, targets[mask]  # (V, H), (N,)
        outs = []
        for a in range(0, len(hidden), chunk):
            ids = None if topk_ids is None else topk_ids[a:a + chunk]
            args = (hidden[a:a + chunk], weight, tgt[a:a + chunk], k, ids)
            outs.append(
                torch.utils.checkpoint.checkpoint(_chunk_stats, *args, use_reentrant=False)
                if grad
                else _chunk_stats(*args)
            )
    if not grad:
        parallel.reshard(model)
    tok, dist, entropy = (torch.cat([o[i] for o in outs]) for i in range(3))
    ids = torch.cat([o[3] for o in outs]) if k else None
    return tok, dist, entropy, ids, mask


def to_padded(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, ...) values of the masked positions -> (B, T, ...) zero-padded."""
    out = flat.new_zeros(mask.shape + flat.shape[1:])
    out[mask] = flat
    return out


def pad_rows(rows: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence values (lengths = mask.sum(1)) -> (B, T) zero-padded like `mask`."""
    return to_padded(torch.cat(rows), mask)
