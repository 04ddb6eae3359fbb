"""Benchmarks of exp02's training step: per stage on the toy world, against TRL, at scale.

    python benchmark_training.py stages --threads 2     # one toy exp02 step, stage by stage
    python benchmark_training.py trl --threads 2        # the same GRPO step in TRL's GRPOTrainer
    python benchmark_training.py --preset tiny-random --device cpu --threads 1 --peak-tflops 0.0784
    python benchmark_training.py --preset qwen3-1.7b --batch 8 --prompt-len 512 --response-len 7680
    python benchmark_training.py --preset qwen3-8b --layers 2 ...  # real width and vocabulary
    python benchmark_training.py loss-head --tokens 20480 --vocab 151936   # the loss head's memory

`train` runs exp02's own `update()` with one mini-batch (forward + backward, pi_old from that
forward, and the optimizer step; SDPO adds the teacher's forward) on distinct prompts (no
shared-prefix forward).

`stages`: the shipped toy model and real toy rollouts; each stage is exp02's own function
(rollout, update, evaluate), timed as exp02 runs it; inside update() the calls of
`infra.loss_head.token_stats` are timed and counted by role (pi_old, student, teacher), so the
split holds whatever else update() does. Each time is the fastest of --repeats (the machine is
shared). `trl`: one exp02 GRPO step and one step of TRL's GRPOTrainer doing the same work (model,
prompts, 16 x 8 completions, 2 optimizer steps of 64, clipping, loss); trl is not in
requirements.txt (install it in a separate venv: README "Benchmarks"). `train` (the default):
exp02's update() on a synthetic batch of fixed-length sequences with random weights built from a
preset's architecture (no download). `loss-head`: the chunked loss head's peak memory.

Model FLOPs per token (PaLM, appendix B): forward 2*N + 4*L*d_attn*T, forward + backward
6*N + 12*L*d_attn*T, where N counts the matmul parameters (the input embedding is a lookup; a
tied head counts once), L layers, d_attn = heads * head_dim, T the sequence length; generation
counts the forward FLOPs of every prompt and generated token. Activation recomputation and padding
are not counted (that would be hardware FLOPs). Share of peak (MFU) = model FLOPs / time / peak.
Writes JSON (and, for `stages`, the table as markdown) to results/bench/.
"""
import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import common
import exp02_onpolicy_grpo_sdpo as exp02
from infra import loss_head, parallel, rollout, run_dirs

# Architectures of the math presets (their config.json on the hub; random weights from these).
QWEN3 = dict(num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960)
ARCH = {
    "qwen3-8b": ("Qwen3Config", dict(QWEN3, hidden_size=4096, intermediate_size=12288,
                                     num_hidden_layers=36, num_attention_heads=32,
                                     tie_word_embeddings=False)),
    "qwen3-1.7b": ("Qwen3Config", dict(QWEN3, hidden_size=2048, intermediate_size=6144,
                                       num_hidden_layers=28, num_attention_heads=16,
                                       tie_word_embeddings=True)),
    "deepseek-r1-distill-qwen-7b": ("Qwen2Config", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=131072)),
    # Olmo 3 7B: the Olmo3Config defaults and the Olmo-3 vocabulary (3 of 4 layers sliding 4096).
    "olmo3-7b-instruct": ("Olmo3Config", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=100278, tie_word_embeddings=False,
        max_position_embeddings=65536)),
}
ARCH["qwen3-8b-nothink"] = ARCH["qwen3-8b"]
# The tests' tiny Qwen3 (tests/tiny.py): byte-level vocabulary, 2 layers of 128.
ARCH["tiny-random"] = ("Qwen3Config", dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, head_dim=32, vocab_size=262, tie_word_embeddings=True,
    max_position_embeddings=4096))
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16 per GPU
# FP32 peak of one core of this container's CPU (AMD EPYC, family 25 model 17: Zen 4): two
# 256-bit FMA pipes (AVX-512 runs as two halves) x 8 fp32 lanes x 2 FLOP = 32 FLOP/cycle, at
# 2.45 GHz (the VM hides the clock under load; the kernel's TSC reads 2.60 GHz, +6 %).
PEAK_GFLOPS_PER_CORE = 32 * 2.45
# reproduce_toy.sh's 39 on-policy runs, each `steps` of exp02's step: GRPO = exp02 (3 seeds) +
# exp04 (3 coverages x 3 seeds); SDPO = exp02 c = s and c = s\think, exp03 (3 teachers), exp04
# (3 coverages) and the drop-hedge control, each x 3 seeds. exp01 and the control's continued
# pretraining are not exp02 steps (README: ~7 min and 691 s).
TOY_RUNS = {"grpo": 3 + 9, "sdpo": 6 + 6 + 9 + 9}  # exp02, exp03 (tau > 0), exp04, 3 controls
TRL_MISSING = ("trl is not installed: the TRL side-by-side needs it, outside requirements.txt "
               "(README \"Benchmarks\": a separate venv with pip install trl)")


def build_model(preset: str, layers: int | None, device: str):
    """(model fp32, pad id, eos id) with random weights; tiny-random and toy load as exp02 does."""
    if preset not in ARCH:
        model, tokenizer, loaded = common.load_model(preset, device=device, dtype=torch.float32)
        if common.pick_world(preset).ACTIVATION_CHECKPOINTING:  # as exp02 trains this world
            model.gradient_checkpointing_enable({"use_reentrant": False})
        return model, tokenizer.pad_token_id, tokenizer.eos_token_id
    import transformers

    name, kwargs = ARCH[preset]
    kwargs = dict(kwargs, num_hidden_layers=layers or kwargs["num_hidden_layers"])
    config = getattr(transformers, name)(**kwargs, pad_token_id=0,
                                         eos_token_id=kwargs["vocab_size"] - 1)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.gradient_checkpointing_enable({"use_reentrant": False})  # as exp02 trains the math world
    return model.eval(), 0, kwargs["vocab_size"] - 1


def flops_per_token(model, seq_len: int, train: bool) -> float:
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    n += model.get_output_embeddings().weight.numel() if c.tie_word_embeddings else 0
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    d_attn = c.num_attention_heads * head_dim
    return (6 if train else 2) * n + (12 if train else 4) * c.num_hidden_layers * d_attn * seq_len


def synthetic_data(args, vocab: int) -> dict:
    """B fixed-length sequences in groups of n, as exp02's collect() returns them; half the
    rollouts succeed, so every SDPO sample has a peer demonstration."""
    g = torch.Generator().manual_seed(0)
    rand = lambda k: torch.randint(1, vocab - 1, (k,), generator=g).tolist()  # noqa: E731
    seqs = [(rand(args.prompt_len), rand(args.response_len)) for _ in range(args.batch)]
    return {"seqs": seqs, "teacher_seqs": [(rand(args.teacher_prompt_len), r) for _, r in seqs],
            "flat": [rollout.Sample(r, "", "length") for _, r in seqs],
            "rewards": torch.tensor([float(i % 2) for i in range(args.batch)]),
            "has_demo": torch.ones(args.batch)}


def rollouts_of(data: dict) -> "exp02.Rollouts":
    """The synthetic batch as exp02.update takes it."""
    return exp02.Rollouts(samples=data["flat"], rewards=data["rewards"],
                          grader=common.GradeReport(correct=[]), seqs=data["seqs"],
                          teacher_seqs=data["teacher_seqs"], has_demo=data["has_demo"])


def update_settings(args) -> "exp02.Settings":
    """exp02's settings for one update of the synthetic batch (one mini-batch)."""
    return exp02.Settings(model=args.preset, prompts_per_step=args.batch // args.rollouts,
                          rollouts=args.rollouts, mini_batches=1, micro_batch_size=args.micro_batch,
                          topk=args.topk, logit_chunk=args.logit_chunk, lr=1e-6)


def bench_update(args, method, student, teacher, data, pad, device) -> dict:
    s = update_settings(args)
    opt = torch.optim.AdamW(student.parameters(), lr=s.lr)
    rows = student.get_output_embeddings().weight.shape[0]
    epistemic = torch.zeros(rows, dtype=torch.bool, device=device)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        exp02.update(dataclasses.replace(s, method=method), student=student, teacher=teacher,
                     opt=opt, rollouts=rollouts_of(data), pad_id=pad, epistemic_ids=epistemic,
                     step=i + 1)
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = sum(times[args.warmup:]) / args.steps
    seq = args.prompt_len + args.response_len
    tokens = args.batch * seq
    flops = tokens * flops_per_token(student, seq, train=True)  # pi_old = its own forward
    if method == "sdpo":
        t_seq = args.teacher_prompt_len + args.response_len
        flops += args.batch * t_seq * flops_per_token(student, t_seq, train=False)
    return {"step_s": seconds, "tokens_per_s": tokens / seconds, "model_flops": flops,
            "mfu": flops / seconds / (args.peak_tflops * 1e12) if args.peak_tflops else None}


def bench_generation(args, model, pad, eos, device) -> dict:
    class NoText:  # random weights: the text is meaningless, only token counts matter
        pad_token_id, eos_token_id = pad, eos

        def decode(self, ids, skip_special_tokens=True):
            return ""

    gen = rollout.HFGenerator(model, NoText())
    g = torch.Generator().manual_seed(1)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = [torch.randint(1, vocab - 1, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch // args.rollouts)]
    sync(device)
    t0 = time.perf_counter()
    out = gen.generate(prompts, n=args.rollouts, temperature=1.0, max_tokens=args.response_len,
                       seed=0)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(x.token_ids) for group in out for x in group)
    return {"backend": "hf", "generated_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}


# ---------------------------------------------------------------------------------------------
# `stages`: one toy exp02 step, stage by stage, with exp02's own functions
# ---------------------------------------------------------------------------------------------
class CountingGenerator:
    """A rollout engine that records the positions it forwards: each prompt of a call once (the
    decoding loop prefills a prompt once for its n samples), then each sample's generated
    tokens (the attention term counts the two parts as separate sequences: a slight undercount)."""

    def __init__(self, generator):
        self.generator, self.lengths = generator, []

    def generate(self, prompts, n=1, **kwargs):
        groups = self.generator.generate(prompts, n=n, **kwargs)
        self.lengths += [len(p) for p in prompts] + [len(x.token_ids) for g in groups for x in g]
        return groups

    def __getattr__(self, name):  # sleep, load_weights, weight_dtype
        return getattr(self.generator, name)


def forwarded_lengths(a: dict) -> list[int]:
    """The lengths token_stats forwards for its bound arguments: each distinct prefix once and
    [prompt[-1]] + response per sequence when the prefix is shared, else whole sequences."""
    pairs = a["pairs"]
    if loss_head.prefix_sharing_pays(a["model"], pairs, a["grad"]):
        return [len(p) for p in loss_head.prefix_groups(pairs)[0]] + [1 + len(r) for _, r in pairs]
    return [len(p) + len(r) for p, r in pairs]


@contextlib.contextmanager
def timed_token_stats(teacher, calls: list, device: str):
    """Wrap infra.loss_head.token_stats, where exp02 looks it up, so that each call inside
    update() appends (role, seconds, sequence lengths): pi_old (the student without grad),
    teacher (the teacher model), student (with grad: its forward; the backward runs later)."""
    original = loss_head.token_stats
    signature = inspect.signature(original)

    def timed(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        sync(device)
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        sync(device)
        role = "student" if a["grad"] else "teacher" if a["model"] is teacher else "pi_old"
        calls.append((role, time.perf_counter() - t0, forwarded_lengths(a)))
        return out

    patched = [m for m in (exp02, loss_head) if getattr(m, "token_stats", None) is original]
    for m in patched:
        m.token_stats = timed
    try:
        yield
    finally:
        for m in patched:
            m.token_stats = original


def stage_settings(args, method: str) -> "exp02.Settings":
    """exp02's settings for the toy world (its defaults unless a flag here says otherwise)."""
    given = dict(prompts_per_step=args.prompts_per_step, rollouts=args.rollouts,
                 eval_n=args.eval_n, max_new_tokens=args.max_new_tokens)
    s = exp02.Settings(model=args.preset, method=method, seed=args.seed, threads=args.threads,
                       device=args.device, **{k: v for k, v in given.items() if v is not None})
    return exp02.resolve(s, common.pick_world(s.model))


def step_batch(s, problems: list[dict], step: int) -> list[dict]:
    """The step's prompts as exp02's default data order draws them."""
    return [problems[i] for i in common.batch_indices(len(problems), s.prompts_per_step, step,
                                                      s.seed)]


def time_rollouts(s, world, preset, tokenizer, student, batch, repeats: int):
    """exp02.rollout (generate B x n at temperature 1, grade), `repeats` identical calls (same
    seed, same samples) after an untimed one -> (seconds of each, lengths, Rollouts)."""
    times = []
    for i in range(1 + repeats):
        gen = CountingGenerator(rollout.make_generator(student, tokenizer, "hf"))
        t0 = time.perf_counter()
        r = exp02.rollout(s, world, preset, tokenizer, gen, batch, step=1)
        times += [time.perf_counter() - t0] if i else []
    return times, gen.lengths, r


def time_teacher_context(s, r, preset, tokenizer, batch, repeats: int):
    """exp02.add_teacher_context on copies of the rollouts -> (seconds of each, SDPO rollouts)."""
    times = []
    for _ in range(repeats):
        sdpo = copy.copy(r)
        t0 = time.perf_counter()
        exp02.add_teacher_context(s, sdpo, preset, tokenizer, batch)
        times.append(time.perf_counter() - t0)
    return times, sdpo


def time_update(s, student, teacher, r, tokenizer, repeats: int, device: str) -> dict:
    """exp02.update() on one step's rollouts, `repeats` times after a warm-up (AdamW creates its
    state on the first step), on a copy of the student -> per role the seconds of each call
    ("update" = the whole call less pi_old and teacher: the student's forward, backward and
    AdamW), the sequence lengths and the number of token_stats calls."""
    student = copy.deepcopy(student)
    opt = torch.optim.AdamW(student.parameters(), lr=s.lr, betas=(0.9, 0.999),
                            weight_decay=s.weight_decay)
    rows = student.get_output_embeddings().weight.shape[0]
    epistemic = common.epistemic_token_ids(tokenizer, rows).to(device)
    times = {k: [] for k in ("pi_old", "teacher", "student", "update")}
    for i in range(1 + repeats):
        calls = []
        sync(device)
        t0 = time.perf_counter()
        with timed_token_stats(teacher, calls, device):
            exp02.update(s, student=student, teacher=teacher, opt=opt, rollouts=r,
                         pad_id=tokenizer.pad_token_id, epistemic_ids=epistemic, step=i + 1)
        sync(device)
        secs = {k: sum(c[1] for c in calls if c[0] == k) for k in ("pi_old", "teacher", "student")}
        secs["update"] = time.perf_counter() - t0 - secs["pi_old"] - secs["teacher"]
        for k in times if i else ():
            times[k].append(secs[k])
    return {"seconds": times, **{f"{k}_lengths": [n for c in calls if c[0] == k for n in c[2]]
                                for k in ("pi_old", "teacher", "student")},
            "calls": {k: sum(c[0] == k for c in calls) for k in ("pi_old", "teacher", "student")}}


def time_evaluation(s, world, preset, student, tokenizer, repeats: int):
    """exp02.evaluate on the toy world's evaluation sets (as exp02 builds them, eval_n graphs
    each, greedy), `repeats` times -> (seconds of each, lengths, metrics, sets)."""
    sets = world.evaluation_sets(s.eval_n, data_dir=s.data_dir, train_graphs=True)
    times = []
    for _ in range(repeats):
        gen = CountingGenerator(rollout.make_generator(student, tokenizer, "hf"))
        with tempfile.TemporaryDirectory() as run:
            t0 = time.perf_counter()
            metrics = exp02.evaluate(s, world, preset, student, tokenizer,
                                     parallel.ShardedGenerator(gen), sets, Path(run))
            times.append(time.perf_counter() - t0)
    return times, gen.lengths, metrics, sets


def stage_row(name: str, times: list[float], lengths: list[int], train: bool, model,
              peak_gflops: float) -> dict:
    """One stage: seconds (the fastest timing: the least disturbed by other jobs), tokens (prompt
    + response of every sequence), model GFLOP and the share of peak (None: no model FLOPs)."""
    seconds = min(times)
    gflop = sum(t * flops_per_token(model, t, train) for t in lengths) / 1e9
    share = gflop / seconds / peak_gflops if gflop else None
    return {"stage": name, "seconds": seconds, "tokens": sum(lengths), "gflop": gflop,
            "gflop_per_s": gflop / seconds, "share_of_peak": share, "timings": times}


def total_row(name: str, parts: list[dict], peak_gflops: float) -> dict:
    """A step: the sum of its stages."""
    seconds, gflop = sum(p["seconds"] for p in parts), sum(p["gflop"] for p in parts)
    return {"stage": name, "seconds": seconds, "tokens": None, "gflop": gflop,
            "gflop_per_s": gflop / seconds, "share_of_peak": gflop / seconds / peak_gflops,
            "parts": [p["stage"] for p in parts]}


def evaluations_per_run(s) -> int:
    """exp02's evaluations in one run: the base (step 0), every eval_every steps and the last."""
    return 1 + len(set(range(s.eval_every, s.steps + 1, s.eval_every)) | {s.steps})


def reproduction_estimate(s, grpo_step_s: float, sdpo_step_s: float, eval_s: float) -> dict:
    """The on-policy part of reproduce_toy.sh from the measured stages: runs x steps x step time
    + runs x evaluations per run x evaluation time, serial at this thread count."""
    runs, evals = TOY_RUNS, evaluations_per_run(s)
    full = 2 + (evals - 2) * (min(s.eval_subset, s.eval_n) / s.eval_n if s.eval_subset else 1)
    train = s.steps * (runs["grpo"] * grpo_step_s + runs["sdpo"] * sdpo_step_s)
    evaluation = sum(runs.values()) * full * eval_s
    return {"formula": "(grpo_runs x grpo_step_s + sdpo_runs x sdpo_step_s) x steps"
                       " + (grpo_runs + sdpo_runs) x full_evaluations_per_run x eval_s (the"
                       " first and last evaluations use every problem, those between"
                       " eval_subset of eval_n)",
            "grpo_runs": runs["grpo"], "sdpo_runs": runs["sdpo"], "steps": s.steps,
            "evals_per_run": evals, "full_evaluations_per_run": full, "train_s": train,
            "evaluation_s": evaluation,
            "total_s": train + evaluation,
            "not_counted": "exp01, the control's pretraining, model loads, checkpoints, logging"}


def stages(args) -> dict:
    """Every stage of one toy exp02 step, GRPO and SDPO, and one evaluation -> the result."""
    grpo, sdpo = stage_settings(args, "grpo"), stage_settings(args, "sdpo")
    world, device, peak = common.pick_world(grpo.model), args.device, args.peak_gflops
    common.set_seed(grpo.seed)
    student, tokenizer, preset = common.load_model(grpo.model, device=device, dtype=torch.float32)
    teacher = exp02.load_teacher(sdpo.model, device, device.startswith("cuda"))
    batch = step_batch(grpo, world.training_problems(512, grpo.train_file), 1)
    n = args.repeats
    roll_s, roll_len, r = time_rollouts(grpo, world, preset, tokenizer, student, batch, n)
    ctx_s, r_sdpo = time_teacher_context(sdpo, r, preset, tokenizer, batch, n)
    g = time_update(grpo, student, None, r, tokenizer, n, device)
    d = time_update(sdpo, student, teacher, r_sdpo, tokenizer, n, device)
    eval_s, eval_len, metrics, sets = time_evaluation(grpo, world, preset, student, tokenizer,
                                                      args.eval_repeats)
    rows = {"rollouts": stage_row(f"rollouts ({len(batch)} x {grpo.rollouts}, generate + grade)",
                                  roll_s, roll_len, False, student, peak),
            "pi_old": stage_row("pi_old forward (no grad)",
                                g["seconds"]["pi_old"] + d["seconds"]["pi_old"],
                                g["pi_old_lengths"], False, student, peak),
            "grpo_update": stage_row(f"GRPO update (fwd + bwd + AdamW, x{grpo.mini_batches})",
                                     g["seconds"]["update"], g["student_lengths"], True, student,
                                     peak),
            "sdpo_context": stage_row("SDPO teacher context (peer demonstrations)", ctx_s, [],
                                      False, student, peak),
            "sdpo_teacher": stage_row("SDPO teacher forward (no grad)", d["seconds"]["teacher"],
                                      d["teacher_lengths"], False, teacher, peak),
            "sdpo_update": stage_row(f"SDPO update (fwd + bwd + AdamW, x{sdpo.mini_batches})",
                                     d["seconds"]["update"], d["student_lengths"], True, student,
                                     peak),
            "evaluation": stage_row(f"evaluation ({len(sets)} sets x {grpo.eval_n}, greedy)",
                                    eval_s, eval_len, False, student, peak)}
    totals = {"grpo_step": total_row("GRPO step", [rows[k] for k in (
                  "rollouts", "pi_old", "grpo_update")], peak),
              "sdpo_step": total_row("SDPO step", [rows[k] for k in (
                  "rollouts", "sdpo_context", "pi_old", "sdpo_teacher", "sdpo_update")], peak)}
    estimate = reproduction_estimate(grpo, totals["grpo_step"]["seconds"],
                                     totals["sdpo_step"]["seconds"],
                                     rows["evaluation"]["seconds"])
    return {"stages": rows, "totals": totals, "toy_reproduction_estimate": estimate,
            "token_stats_calls": {"grpo": g["calls"], "sdpo": d["calls"]},
            "student_forward_s": {"grpo": min(g["seconds"]["student"]),
                                  "sdpo": min(d["seconds"]["student"])},
            "sequences": len(r.samples), "reward": r.rewards.mean().item(),
            "demo_fraction": r_sdpo.has_demo.mean().item(),
            "eval_in_domain_avg@1": metrics.get("eval/in_domain/avg@1")}


def stage_header(result: dict) -> str:
    """What was measured where: the command, the machine and its load, the peak."""
    a, m, p = result["settings"], result["machine"], result["packages"]
    return (f"`python benchmark_training.py stages --threads {a['threads']}` "
            f"({a['device']}, seed {a['seed']}, fastest of {a['repeats']} timings; evaluation "
            f"{a['eval_repeats']}): {m['device']}, load average "
            f"{', '.join(f'{x:.2f}' for x in m['load_average'])} (the cores are shared), "
            f"OMP_WAIT_POLICY {m['omp_wait_policy'] or 'unset (threads spin)'}; peak "
            f"{a['peak_gflops']:.1f} GFLOP/s (on CPU: threads x 32 fp32 FLOP/cycle x 2.45 GHz); "
            f"torch {p.get('torch')}, transformers {p.get('transformers')}.")


def stage_table(result: dict) -> str:
    """The stages and the two steps as a markdown table, then the reproduction estimate."""
    fmt = lambda x, f: "—" if x is None else format(x, f)  # noqa: E731
    lines = ["| stage | seconds | tokens | GFLOP | GFLOP/s | share of peak |",
             "|---|---|---|---|---|---|"]
    for row in [*result["stages"].values(), *result["totals"].values()]:
        name = row["stage"] if "parts" not in row else f"**{row['stage']}** (sum)"
        lines.append(f"| {name} | {row['seconds']:.3f} | {fmt(row['tokens'], ',')} | "
                     f"{row['gflop']:.2f} | {row['gflop_per_s']:.1f} | "
                     f"{fmt(row['share_of_peak'], '.1%')} |")
    e = result["toy_reproduction_estimate"]
    lines += ["", f"Toy reproduction, on-policy part (serial at this thread count): "
              f"{e['formula']} = ({e['grpo_runs']} x {result['totals']['grpo_step']['seconds']:.2f}"
              f" + {e['sdpo_runs']} x {result['totals']['sdpo_step']['seconds']:.2f}) x "
              f"{e['steps']} + {e['grpo_runs'] + e['sdpo_runs']} x "
              f"{e['full_evaluations_per_run']:.2f} x "
              f"{result['stages']['evaluation']['seconds']:.2f} = {e['total_s']:.0f} s "
              f"({e['total_s'] / 60:.1f} min); not counted: {e['not_counted']}."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `trl`: the same GRPO step in exp02 and in TRL's GRPOTrainer
# ---------------------------------------------------------------------------------------------
def ours_grpo_step(args, s, world, problems) -> dict:
    """exp02's GRPO step (rollout: generate + grade; update: pi_old forward, then mini_batches
    optimizer steps) at steps 1 (warm-up) and 2 (timed), on a fresh copy of the model."""
    student, tokenizer, preset = common.load_model(s.model, device=args.device,
                                                   dtype=torch.float32)
    gen = rollout.make_generator(student, tokenizer, "hf")
    opt = torch.optim.AdamW(student.parameters(), lr=s.lr, betas=(0.9, 0.999),
                            weight_decay=s.weight_decay)
    rows = student.get_output_embeddings().weight.shape[0]
    epistemic = common.epistemic_token_ids(tokenizer, rows).to(args.device)
    for step in (1, 2):
        batch = step_batch(s, problems, step)
        t0 = time.perf_counter()
        r = exp02.rollout(s, world, preset, tokenizer, gen, batch, step)
        exp02.update(s, student=student, teacher=None, opt=opt, rollouts=r,
                     pad_id=tokenizer.pad_token_id, epistemic_ids=epistemic, step=step)
        seconds = time.perf_counter() - t0
    return step_summary(seconds, [len(p) for p, _ in r.seqs], [len(c) for _, c in r.seqs],
                        r.rewards.mean().item())


def step_summary(seconds: float, prompt_lens: list[int], completion_lens: list[int],
                 reward: float) -> dict:
    n = len(completion_lens)
    return {"seconds": seconds, "completions": n, "ms_per_completion": 1000 * seconds / n,
            "mean_prompt_tokens": sum(prompt_lens) / n,
            "mean_completion_tokens": sum(completion_lens) / n, "reward": reward,
            "torch_threads": torch.get_num_threads()}


def trl_config(s, out_dir: str, device: str, thinking: bool):
    """GRPOConfig for exp02's toy GRPO step: B x n completions per generation, mini_batches
    optimizer steps of B x n / mini_batches each (one forward per step, as exp02's micro-batch
    of 64), pi_old from a separate forward (TRL does it when steps_per_generation exceeds the
    accumulation steps), clip 0.2 / 0.28 with the dual clip 3 (TRL's delta), no KL, per-sequence
    token mean (loss_type grpo), advantages r - mean (scale_rewards none)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir, seed=s.seed, use_cpu=device == "cpu", bf16=False, fp16=False,
        per_device_train_batch_size=s.prompts_per_step * s.rollouts // s.mini_batches,
        gradient_accumulation_steps=1, steps_per_generation=s.mini_batches, num_iterations=1,
        num_generations=s.rollouts, max_completion_length=s.max_new_tokens,
        temperature=s.temperature, top_p=s.top_p, top_k=0, beta=0.0, epsilon=s.clip_low,
        epsilon_high=s.clip_high, delta=s.dual_clip, loss_type="grpo", scale_rewards="none",
        learning_rate=s.lr, lr_scheduler_type="constant", weight_decay=s.weight_decay,
        max_grad_norm=s.grad_clip, optim="adamw_torch", gradient_checkpointing=False,
        max_steps=2 * s.mini_batches, logging_strategy="no", save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
        chat_template_kwargs={"enable_thinking": thinking})


def trl_grpo_step(args, s, world, problems) -> dict:
    """TRL's GRPOTrainer on the same model, prompts and reward: 2 generations of B x n, each for
    mini_batches optimizer steps; the first is the warm-up, the second is timed (end of step
    mini_batches to end of step 2 x mini_batches)."""
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    student, tokenizer, preset = common.load_model(s.model, device=args.device,
                                                   dtype=torch.float32)
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}], "gold": p["gold"]}
            for p in problems]

    graded = []  # the last generation's rewards

    def toy_reward(completions, gold, **kwargs):  # the world's verifier, as exp02's reward
        texts = [c[0]["content"] for c in completions]
        graded[:] = world.grade(texts, gold, preset["think_in_prompt"]).correct
        return [float(x) for x in graded]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.threads = {}, []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends[state.global_step] = time.perf_counter()
            self.threads.append(torch.get_num_threads())

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(model=student, reward_funcs=toy_reward,
                              args=trl_config(s, out, args.device, preset["thinking"]),
                              processing_class=tokenizer,
                              train_dataset=datasets.Dataset.from_list(rows), callbacks=[clock])
        trainer.train()
    seconds = clock.ends[2 * s.mini_batches] - clock.ends[s.mini_batches]
    last = trainer._buffered_inputs  # the timed generation, split into mini_batches parts
    prompts = [ids[m.bool()].tolist() for b in last for ids, m in zip(b["prompt_ids"],
                                                                      b["prompt_mask"])]
    ours = {tuple(common.prompt_ids(tokenizer, p["prompt"], preset["thinking"]))
            for p in problems}
    completion_lens = [int(m.sum()) for b in last for m in b["completion_mask"]]
    out = step_summary(seconds, [len(p) for p in prompts], completion_lens,
                       sum(graded) / len(graded))
    return dict(out, same_prompt_ids=all(tuple(p) in ours for p in prompts),
                torch_threads=min(clock.threads))


def trl_side_by_side(args) -> dict:
    """One exp02 GRPO step and one TRL GRPOTrainer step doing the same work -> ms/completion."""
    import trl
    import transformers

    s = stage_settings(args, "grpo")
    world = common.pick_world(s.model)
    problems = world.training_problems(512, s.train_file)
    common.set_seed(s.seed)
    ours = ours_grpo_step(args, s, world, problems)
    common.set_seed(s.seed)
    theirs = trl_grpo_step(args, s, world, problems)
    return {"ours_exp02": ours, "trl_grpo_trainer": theirs,
            "trl_over_ours": theirs["ms_per_completion"] / ours["ms_per_completion"],
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__},
            "work": {"prompts_per_step": s.prompts_per_step, "rollouts": s.rollouts,
                     "optimizer_steps": s.mini_batches, "max_completion_tokens": s.max_new_tokens,
                     "temperature": s.temperature, "clip": [s.clip_low, s.clip_high],
                     "dual_clip": s.dual_clip, "lr": s.lr}}


def loss_head_memory(args) -> dict:
    """Peak memory of exp02's chunked loss head for N response tokens and a V-word vocabulary:
    what autograd keeps (exact, from saved-tensor hooks) and the process's peak RSS increase
    during forward + backward (CPU), at a small hidden size with the real N and V."""
    torch.set_num_threads(args.threads)
    n, v, h, k = args.tokens, args.vocab, args.hidden, args.topk
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (0.02 * torch.randn(v, h)).requires_grad_()
    targets = torch.randint(0, v, (n,))
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [torch.utils.checkpoint.checkpoint(
                    loss_head._chunk_stats, hidden[a:a + args.logit_chunk], weight,
                    targets[a:a + args.logit_chunk], k, None, use_reentrant=False)
                for a in range(0, n, args.logit_chunk)]
        loss = torch.cat([o[0] for o in outs]).sum() + torch.cat([o[1] for o in outs]).exp().sum()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    chunk_vocab_fp32 = min(args.logit_chunk, n) * v * 4
    return {"tokens": n, "vocab": v, "hidden_size": h, "topk": k, "chunk": args.logit_chunk,
            "kept_for_backward_bytes": sum(kept.values()),
            "kept_beyond_weight_and_hidden_bytes": sum(kept.values()) - v * h * 4 - n * h * 4,
            "peak_rss_increase_bytes": peak, "chunk_x_vocab_fp32_bytes": chunk_vocab_fp32,
            "peak_in_chunk_x_vocab_buffers": peak / chunk_vocab_fp32,
            "unchunked_logits_fp32_bytes": n * v * 4, "seconds": time.perf_counter() - t0}


def loss_head_cuda_peak(tokens: int, vocab: int, hidden: int, topk: int, chunk: int) -> dict:
    """CUDA peak memory of exp02's chunked loss head (forward + backward, fp32) beyond its inputs,
    against the README's bound: 6 fp32 (chunk x V) buffers + the head's and the hidden states'
    gradients."""
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device="cuda", requires_grad=True)
    weight = (0.02 * torch.randn(vocab, hidden, device="cuda")).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    outs = [torch.utils.checkpoint.checkpoint(loss_head._chunk_stats, h[a:a + chunk], weight,
                                              targets[a:a + chunk], topk, None, use_reentrant=False)
            for a in range(0, tokens, chunk)]
    (torch.cat([o[0] for o in outs]).sum() + torch.cat([o[1] for o in outs]).exp().sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    bound = 6 * min(chunk, tokens) * vocab * 4 + 2 * vocab * hidden * 4 + tokens * hidden * 4
    return {"tokens": tokens, "vocab": vocab, "hidden_size": hidden, "topk": topk, "chunk": chunk,
            "peak_bytes": peak, "bound_bytes": bound, "within_bound": peak < bound,
            "unchunked_logits_fp32_bytes": tokens * vocab * 4, "seconds": time.perf_counter() - t0}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    arg = p.add_argument
    arg("mode", nargs="?", default="train", choices=["train", "stages", "trl", "loss-head"])
    arg("--preset", default=None, help=f"default toy (stages, trl), tiny-random (train): "
        f"tiny-random | toy | {' | '.join(ARCH)}")
    arg("--layers", type=int, default=None, help="train: fewer decoder layers (random presets)")
    arg("--device", default=common.default_device())
    arg("--threads", type=int, default=2, help="torch CPU threads")
    arg("--out", default=None, help="the JSON file (default: results/bench/<name>.json)")
    arg("--seed", type=int, default=0, help="stages, trl: exp02's seed (sampling, data order)")
    arg("--prompts-per-step", type=int, default=None, help="stages, trl: B (default: exp02's)")
    arg("--rollouts", type=int, default=None, help="n per prompt (default: exp02's; train: 4)")
    arg("--eval-n", type=int, default=None, help="stages: graphs per evaluation set (exp02's)")
    arg("--max-new-tokens", type=int, default=None, help="stages, trl: (default: exp02's)")
    arg("--repeats", type=int, default=2, help="stages: timings per stage (the fastest is kept)")
    arg("--eval-repeats", type=int, default=1, help="stages: timings of the evaluation")
    arg("--peak-gflops", type=float, default=None, help="stages: peak GFLOP/s (default: "
        f"threads x {PEAK_GFLOPS_PER_CORE:.1f} on CPU, the PEAK_TFLOPS table on a GPU)")
    arg("--batch", type=int, default=8, help="train: sequences per update (B x n)")
    arg("--prompt-len", type=int, default=64, help="train")
    arg("--response-len", type=int, default=192, help="train")
    arg("--teacher-prompt-len", type=int, default=None, help="train: default prompt + response")
    arg("--micro-batch", type=int, default=4, help="train")
    arg("--topk", type=int, default=100, help="train, loss-head")
    arg("--logit-chunk", type=int, default=2048, help="train, loss-head")
    arg("--steps", type=int, default=3, help="train: timed updates")
    arg("--warmup", type=int, default=1, help="train: untimed updates first")
    arg("--peak-tflops", type=float, default=None, help="train: peak per device (GPU table)")
    arg("--tokens", type=int, default=20480, help="loss-head: response tokens N")
    arg("--vocab", type=int, default=151936, help="loss-head: vocabulary V")
    arg("--hidden", type=int, default=64, help="loss-head: hidden size (memory is about N, V)")
    args = p.parse_args(argv)
    args.preset = args.preset or ("tiny-random" if args.mode == "train" else "toy")
    return args


def peak_gflops(args) -> float:
    """--peak-gflops, else the GPU's dense bf16 peak or the CPU cores' FP32 peak."""
    if args.peak_gflops or not args.device.startswith("cuda"):
        return args.peak_gflops or args.threads * PEAK_GFLOPS_PER_CORE
    gpu = torch.cuda.get_device_name()
    return 1000 * next((v for k, v in PEAK_TFLOPS.items() if k in gpu), math.nan)


def train(args) -> tuple[dict, str]:
    """exp02's update() and generation on a synthetic batch of a preset's architecture."""
    args.rollouts = args.rollouts or 4
    args.teacher_prompt_len = args.teacher_prompt_len or args.prompt_len + args.response_len
    if args.peak_tflops is None and args.device.startswith("cuda"):
        gpu = torch.cuda.get_device_name()
        args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    student, pad, eos = build_model(args.preset, args.layers, args.device)
    vocab = student.get_output_embeddings().weight.shape[0]
    args.topk = min(args.topk, vocab)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    teacher = copy.deepcopy(student).to(dtype).eval()
    data = synthetic_data(args, vocab)
    result = {"grpo_update": bench_update(args, "grpo", student, None, data, pad, args.device),
              "sdpo_update": bench_update(args, "sdpo", student, teacher, data, pad, args.device),
              "generation": bench_generation(args, student, pad, eos, args.device),
              "parameters": sum(p.numel() for p in student.parameters())}
    layers = f"_L{args.layers}" if args.layers else ""
    return result, f"training_{args.preset}{layers}_{args.device.split(':')[0]}"


def run_mode(args) -> tuple[dict, str] | None:
    """The mode's result and its file name; None when it cannot run here (message printed)."""
    device = args.device.split(":")[0]
    if args.mode == "loss-head":
        name = f"loss_head_N{args.tokens}_V{args.vocab}_chunk{args.logit_chunk}"
        return {"loss_head": loss_head_memory(args)}, name
    if args.mode == "stages":
        args.peak_gflops = peak_gflops(args)
        return stages(args), f"stages_{args.preset}_{device}_{args.threads}threads"
    if args.mode == "trl":
        if importlib.util.find_spec("trl") is None:
            print(TRL_MISSING, file=sys.stderr)
            return None
        return trl_side_by_side(args), f"trl_vs_exp02_{args.preset}_{device}_{args.threads}threads"
    return train(args)


def main(argv=None):
    args = parse_args(argv)
    parallel.cpu_threads(args.threads)
    env = run_dirs.environment_info()
    t0 = time.perf_counter()
    ran = run_mode(args)
    if ran is None:
        return None
    result, name = ran
    machine = {"device": env["cuda"] or f"CPU, {os.cpu_count()} cores", "cpu": env["cpu"],
               "platform": env["platform"],
               "load_average": os.getloadavg(), "seconds": time.perf_counter() - t0,
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}  # unset: active (spins)
    result = {"settings": vars(args), "machine": machine, "packages": env["packages"], **result}
    out = Path(args.out or f"results/bench/{name}.json")
    common.write_json_atomic(out, result)
    if args.mode == "stages":
        table = stage_table(result)
        common.write_json_atomic(out.with_suffix(".md"), f"{stage_header(result)}\n\n{table}\n")
        print(table)
    else:
        print(json.dumps({k: v for k, v in result.items() if k not in ("settings", "packages")},
                         indent=2))
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
