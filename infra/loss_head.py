"""The training step's plumbing: packing (prompt, response) pairs, the chunked log-prob /
top-k head (no positions x vocabulary tensor kept), and a plain next-token step.

Infrastructure only (the science is in the experiments, common.py and the worlds)."""
from __future__ import annotations

import itertools

import torch
import torch.utils.checkpoint
from transformers.cache_utils import Cache, DynamicLayer

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


def last_hidden_state(model, input_ids, attention_mask, **kwargs) -> torch.Tensor:
    """The decoder's final-norm hidden states (B, T, H). The root forward runs (not model.model
    alone) so that FSDP gathers the root's weights (embeddings, norm, head), with logits of the
    last position only; a hook on the decoder takes its output, so no layer's states are kept
    beyond the last (output_hidden_states would keep all of them: ~6.5 GB per 21.5k-token
    sequence at 8B in the teacher's no-grad forward). `kwargs` go to the forward (default
    use_cache=False)."""
    box = []

    def take(module, args, out):
        box.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

    handle = model.model.register_forward_hook(take)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1,
              **{"use_cache": False, **kwargs})
    finally:
        handle.remove()
    return box[0]


class SharedPrefixLayer(DynamicLayer):
    """One decoder layer's cache for shared_prefix_hidden: the prefix forward stores the K/V of
    the U distinct prefixes (U, heads, Lp, d) as a DynamicLayer does; once `owner` (B,) maps
    each sequence to its prefix, update() returns [its prefix's K/V ; the new K/V] and stores
    nothing, so only one layer's expanded copy exists at a time (no-grad forwards)."""

    owner = None

    def update(self, keys, values, *args, **kwargs):
        if self.owner is None:
            return super().update(keys, values, *args, **kwargs)
        return (torch.cat([self.keys[self.owner], keys], dim=-2),  # (B, heads, Lp + Ls, d)
                torch.cat([self.values[self.owner], values], dim=-2))


def prefix_groups(pairs: list[tuple[list[int], list[int]]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prefixes prompt[:-1] in order of first use, and each sequence's index into
    them. The prompt's last token is not in the prefix: its position predicts the response's
    first token, so it is forwarded with the response."""
    index = {}
    owner = [index.setdefault(tuple(p[:-1]), len(index)) for p, _ in pairs]
    return [list(u) for u in index], owner


def prefix_sharing_pays(model, pairs: list[tuple[list[int], list[int]]], grad: bool) -> bool:
    """Whether shared_prefix_hidden can run and forwards fewer positions than the plain packed
    forward: U * Lp + B * Ls < B * T. It cannot under gradient checkpointing in training
    (transformers then drops the cache in each layer), on an FSDP2-sharded model with grad (a
    layer's backward through its second forward finds its weights freed by the first's: FSDP2
    does not support two forwards before one backward), with sliding-window layers (their
    window is counted in cache slots, which the padded prefixes shift), or with a one-token
    prompt (an empty prefix: an attention row with nothing to attend to). Sharded, the ranks
    decide together (their forwards' collectives must match): all ranks share or none does."""
    config = model.config
    if (model.training and getattr(model, "is_gradient_checkpointing", False)
            or grad and parallel.is_sharded(model)
            or any(t != "full_attention" for t in getattr(config, "layer_types", None) or [])):
        return False
    prefixes, _ = prefix_groups(pairs)
    suffix = 1 + max(len(r) for _, r in pairs)
    shared = len(prefixes) * max(map(len, prefixes)) + len(pairs) * suffix
    pays = (min(len(p) for p, _ in pairs) >= 2
            and shared < len(pairs) * max(len(p) + len(r) for p, r in pairs))
    return all(parallel.gather_objects(pays)) if parallel.is_sharded(model) else pays


BUCKET_COST = 32  # a forward's fixed cost in padded positions (toy model, CPU; see buckets)


def buckets(lengths: list[int], cost: int) -> list[list[int]]:
    """Sequences grouped for separate forwards to cut padding: sorted by length, then cut into
    runs minimising sum(rows x longest) + cost x runs (dynamic programming over the cuts), so a
    batch of mostly short responses and a few long ones is not padded to the longest. Returns
    the index lists, shortest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, best, cut = len(order), [0.0], [0]  # best[j]: least cost of the first j sorted sequences
    for j in range(1, n + 1):
        c, i = min((best[i] + (j - i) * lengths[order[j - 1]] + cost, i) for i in range(j))
        best.append(c)
        cut.append(i)
    runs, j = [], n
    while j:
        runs.append(order[cut[j]:j])
        j = cut[j]
    return runs[::-1]


def shared_prefix_hidden(model, pairs, pad_id: int, device) -> torch.Tensor:
    """The final hidden states (N, H) at the positions that predict the response tokens
    (row-major, as token_stats orders them), forwarding each distinct prefix once ("Prefix
    Grouper", arXiv 2506.05433: the same values and gradients as the plain forward):

        prefix_u = prompt[:-1]  (U distinct),   suffix_i = [prompt_i[-1]] + response_i
        K/V_u    = f(prefix_u)                  right-padded (U, Lp), positions 0, 1, ...
        h_i      = f(suffix_i | K/V_u(i))       (b, Ls), positions |prefix_i| + t, each attending
                                                to [prefix_u(i) ; suffix_i[:t+1]] (pads masked)

    The suffixes run in length buckets (`buckets`: one forward per bucket, each padded to its
    own longest), so a few long responses do not pad the whole batch; an FSDP2-sharded model
    takes one bucket (every rank must run the same forwards). Gradients reach the prefix
    forward through its K/V, summed over the sequences sharing it. Two or more forwards
    through the model: with grad, not for an FSDP2-sharded one (see prefix_sharing_pays).
    Memory: every layer's prefix K/V (U x Lp positions) lives through the suffix forwards,
    where a plain no-grad forward holds one layer's at a time; with grad both paths keep each
    layer's K/V for backward."""
    prefixes, owner = prefix_groups(pairs)
    owner = torch.tensor(owner)  # (B,)
    pre_ids, pre_att, _ = pack_sequences([(u, []) for u in prefixes], pad_id)  # (U, Lp)
    cache = Cache(layers=[SharedPrefixLayer() for _ in range(model.config.num_hidden_layers)])
    model(input_ids=pre_ids.to(device), attention_mask=pre_att.to(device), past_key_values=cache,
          use_cache=True, logits_to_keep=1)
    prefix_len, lengths = pre_att.sum(1), [1 + len(r) for _, r in pairs]  # (U,), suffix lengths
    runs = ([list(range(len(pairs)))] if parallel.is_sharded(model)
            else buckets(lengths, BUCKET_COST))
    offset = [0, *itertools.accumulate(len(r) for _, r in pairs)]  # row-major starts
    hidden, order = [], []  # each bucket's (N_b, H); each of its rows' row-major position
    for run in runs:
        own = owner[torch.tensor(run)]  # (b,) each sequence's prefix
        suf_ids, suf_att, suf_lab = pack_sequences([(pairs[i][0][-1:], pairs[i][1]) for i in run],
                                                   pad_id)  # (b, Ls)
        positions = prefix_len[own][:, None] + torch.arange(suf_ids.shape[1])  # (b, Ls)
        att = torch.cat([pre_att[own], suf_att], dim=1)  # (b, Lp + Ls)
        for layer in cache.layers:
            layer.owner = own.to(device)
        h = last_hidden_state(model, suf_ids.to(device), att.to(device),
                              position_ids=positions.to(device), past_key_values=cache,
                              use_cache=True)  # (b, Ls, H)
        hidden.append(h[:, :-1][suf_lab[:, 1:].to(device) != -100])  # (N_b, H)
        order += [offset[i] + t for i in run for t in range(lengths[i] - 1)]
    return torch.cat(hidden)[torch.argsort(torch.tensor(order))]  # (N, H) row-major


def token_stats(
    model,
    pairs: list[tuple[list[int], list[int]]],
    pad_id: int,
    k: int | None,
    chunk: int,
    topk_ids=None,
    grad: bool = True,
):
    """For the N response tokens of [(prompt ids, response ids)] (row-major): log-prob of each
    token, the distribution over the top-k ids (the student's own when topk_ids is None, else
    the given ids; k = 0: the full vocabulary; k = None: none), entropy, the ids, and the
    (B, T-1) mask of response positions of the packed batch (pack_sequences). Sequences that
    share a prompt share its forward where that forwards fewer positions (shared_prefix_hidden;
    the same values). With grad, each chunk is recomputed in backward (checkpoint), so only
    (N, K) is kept."""
    device = next(model.parameters()).device
    ids, att, labels = (t.to(device) for t in pack_sequences(pairs, pad_id))  # (B, T) each
    targets = labels[:, 1:]  # (B, T-1) position p predicts token p+1
    mask = targets != -100  # (B, T-1)
    with torch.set_grad_enabled(grad), parallel.bf16_compute(device):
        if prefix_sharing_pays(model, pairs, grad):
            hidden = shared_prefix_hidden(model, pairs, pad_id, device)  # (N, H)
        else:
            hidden = last_hidden_state(model, ids, att)[:, :-1][mask]  # (N, H)
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


def sequence_log_probs(model, pairs, pad_id: int, chunk: int, micro_batch: int) -> list:
    """Each sequence's response-token log-probs (its own (len(response),) tensor), no grad, in
    micro-batches of `micro_batch` sequences."""
    rows = []
    for a in range(0, len(pairs), micro_batch):
        tok, _, _, _, mask = token_stats(model, pairs[a:a + micro_batch], pad_id, None, chunk,
                                         grad=False)
        rows += list(tok.split(mask.sum(1).tolist()))
    return rows


def to_padded(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, ...) values of the masked positions -> (B, T, ...) zero-padded."""
    out = flat.new_zeros(mask.shape + flat.shape[1:])
    out[mask] = flat
    return out


def pad_rows(rows: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence values (lengths = mask.sum(1)) -> (B, T) zero-padded like `mask`."""
    return to_padded(torch.cat(rows), mask)
