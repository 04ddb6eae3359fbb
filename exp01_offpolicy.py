"""exp01 — context richness (claim C1, paper Table 1) and off-policy self-distillation by SFT
(claim C2, paper Table 2); docs/PROTOCOL.md §3–4.

C1: given one of its own correct solutions in the prompt, the model answers correctly far more
often, with much shorter responses and almost no epistemic words.
C2: SFT on solution-guided correct traces (D_sg) degrades out-of-distribution reasoning, while SFT
on the model's own unguided correct traces (D_ug) does not, although both hold only correct answers.

  1. Sample `samples` unguided responses per training question; keep questions with
     band_low..band_high correct, up to `max_questions`.
  2. Re-ask each kept question with a teacher context c (common.teacher_message):
     none | s (own first correct response, thinking included) | s_nothink (its thinking removed)
     | regenerated (a round-2 hint: the first correct response of round 1 under c = s).
  3. D_ug = own first correct unguided response per question; D_sg = first correct response under
     c = s. The student prompt never holds the hint. SFT one copy of the base on each.
  4. Evaluate base, SFT-D_ug and SFT-D_sg (toy: held-out in-domain graphs, OOD cells and the
     training graphs, greedy; math: AIME24, AIME25, AMC23, MATH500 avg@k and pass@k).

  python exp01_offpolicy.py                          # toy world, one seed (~3 min on 2 CPU cores)
  python exp01_offpolicy.py --seeds 0,1,2            # the README's tables (mean ± std)
  python exp01_offpolicy.py --model deepseek-r1-distill-qwen-7b   # the paper's setting (GPU)

Where we depart from the paper and its release (also in the README):
 1. The release ships no SFT recipe. Ours: AdamW (0.9/0.999, weight decay 0.01), constant lr after a
    short linear warm-up, grad clip 1.0, cross-entropy on response tokens only; the SAME number of
    optimizer steps and sequences per step for D_ug and D_sg (sft_epochs over D_ug). D_sg traces are
    shorter, so the D_sg student sees fewer tokens: the token counts are reported (`sft/*/tokens`).
    The mismatch works against C2 (less training, closer to the base).
 2. Unlike the release, the unguided responses' length and epistemic counts are measured too.
 3. One grader (math-verify in worker processes) for selection and evaluation; DAPO-Math-17k is
    de-duplicated and sampled with the seed; pass@k is the unbiased estimator.
 4. Toy world: the band is 1..8 correct of 8 (the base solves the slice at ~0.9, so the paper's
    1..4 band would keep almost nothing), SFT lr 2e-4 for 10 epochs of D_ug; evaluation is greedy.
 5. Budget forcing (a control, toy default): each model is also evaluated with its first `</think>`
    replaced by `wait` (`Wait` for math models) and generation continued, as in s1 (Muennighoff et
    al. 2025): does the word alone bring the search back?
 6. Resume is per stage: selection, each context, each SFT student and each evaluation are saved in
    the run directory as they finish, and `--resume` skips what is there.
"""

import copy
import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import common
from infra import parallel, progress, run_dirs, tables
from infra.loss_head import lm_step
from infra.rollout import Sample, make_generator
from infra.settings import Interrupted, arg, cli, parse_settings, world_defaults
from infra.settings import progress as run_state  # where a run directory stands


@dataclass
class Settings:
    model: str = arg("toy", "model preset (see common.PRESETS), local directory or hub id")
    seed: int = arg(0, "seed of the run (question order, sampling, SFT order)")
    seeds: str = arg("", "comma-separated seeds to run one after another (overrides --seed), e.g. "
                     "0,1,2")
    out_dir: str = arg("runs/{model}/exp01", "output directory ({model} = the --model name); each "
                       "seed writes <out_dir>/seed<k>/")
    overwrite: bool = arg(False, "allow replacing a finished run directory")
    resume: bool = arg(False, "continue an unfinished run directory, skipping the stages it "
                       "already holds")
    samples: int = arg(8, "responses per question and context (paper: 8)")
    band_low: int = arg(1, "keep questions with at least this many correct unguided samples "
                        "(paper: 1)")
    band_high: int | None = arg(None, "... and at most this many (paper: 4)", toy=8, math=4)
    max_questions: int = arg(100, "stop selecting at this many questions (paper: 100)")
    max_candidates: int | None = arg(None, "questions tried before giving up", toy=400, math=3000)
    temperature: float = arg(0.6, "sampling temperature of section 3 (paper: 0.6)")
    top_p: float = arg(0.95, "sampling top-p of section 3 (paper: 0.95)")
    max_new_tokens: int | None = arg(None, "max response tokens when sampling (default: the model "
                                           "preset's: toy 64, math presets 38912)")
    sft_epochs: float | None = arg(None, "SFT length in epochs of D_ug; D_sg gets as many steps",
                                   toy=10, math=3)
    sft_batch_size: int = arg(16, "SFT sequences per optimizer step")
    sft_lr: float | None = arg(None, "SFT learning rate", toy=2e-4, math=1e-5)
    sft_warmup: int = arg(5, "SFT linear warm-up steps, starting at lr/sft_warmup")
    eval_n: int = arg(200, "toy world: held-out graphs per evaluation cell")
    eval_k: int = arg(16, "math world: samples per problem (avg@k, pass@k); the toy world is "
                      "greedy, k = 1")
    eval_sets: str = arg("aime24,aime25,amc23,math500", "math world: evaluation sets")
    budget_forcing: bool | None = arg(None, "also evaluate with the first </think> replaced by "
                                      "wait", toy=True, math=False)
    train_file: str | None = arg(None, "math: local training parquet in the paper's layout "
                                 "(default: DAPO-Math-17k from the hub)")
    data_dir: str | None = arg(None, "math: directory with the evaluation parquet files in the "
                               "paper's layout (default: the hub)")
    backend: str = arg("auto", "generation backend: auto | hf | vllm")
    device: str | None = arg(None, "cpu | cuda (default: cuda when available)")
    threads: int = arg(2, "torch CPU threads")

    # How a sweep is launched, not what one run computes: --resume ignores a change in these.
    SWEEP_ONLY: ClassVar[tuple] = ("seeds", "resume", "overwrite", "out_dir")


CONTEXTS = ("none", "s", "s_nothink", "regenerated")


# ---------------------------------------------------------------------------------------------
# Teacher contexts and the two SFT sets
# ---------------------------------------------------------------------------------------------
def context_message(question: str, context: str, solution: str | None,
                    think_in_prompt: bool) -> str | None:
    """The user message of one context: the bare question (none), or the release's hint format with
    the solution (s, regenerated) or the solution without its thinking (s_nothink). None when the
    context has no solution for this question."""
    if context == "none":
        return question
    if solution is None:
        return None
    hint = common.strip_thinking(solution, think_in_prompt) if context == "s_nothink" else solution
    return common.teacher_message(question, hint)


class BudgetForcing:
    """A generator wrapper (s1-style budget forcing): where a response closes its thinking, cut it
    there, append `word` and let the model continue once. Same interface as the generators."""

    def __init__(self, generator, tokenizer, word: str):
        self.inner, self.tokenizer = generator, tokenizer
        self.close_id = tokenizer.convert_tokens_to_ids("</think>")
        self.word_ids = tokenizer(word, add_special_tokens=False).input_ids

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=256, seed=0):
        groups = self.inner.generate(prompts, n=n, temperature=temperature, top_p=top_p,
                                     top_k=top_k, max_tokens=max_tokens, seed=seed)
        todo = [(g, j, x.token_ids[:x.token_ids.index(self.close_id)] + self.word_ids)
                for g, group in enumerate(groups) for j, x in enumerate(group)
                if self.close_id in x.token_ids]
        todo = [(g, j, prefix) for g, j, prefix in todo if len(prefix) < max_tokens]
        if not todo:
            return groups
        more = self.inner.generate([prompts[g] + prefix for g, _, prefix in todo], n=1,
                                   temperature=temperature, top_p=top_p, top_k=top_k,
                                   max_tokens=max_tokens, seed=seed + 1)
        for (g, j, prefix), [cont] in zip(todo, more):
            ids = (prefix + cont.token_ids)[:max_tokens]
            stop = cont.finish_reason == "stop" and len(prefix) + len(cont.token_ids) <= max_tokens
            groups[g][j] = Sample(ids, self.tokenizer.decode(ids, skip_special_tokens=True),
                                         "stop" if stop else "length")
        return groups


# ---------------------------------------------------------------------------------------------
# Stages (each saved in the run directory as it finishes, so --resume can skip it)
# ---------------------------------------------------------------------------------------------
def stage(run: Path, name: str, fn):
    """fn() -> JSON-able result, cached in <run>/stages/<name>.json (atomic)."""
    path = run / "stages" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    out = fn()
    common.write_json_atomic(path, out)
    return out


def sample_and_grade(world, generator, tokenizer, preset, messages: list[str], golds: list[str],
                     s: Settings, seed: int):
    """`samples` responses per message -> [{"ids", "text", "finish", "correct"}] per message."""
    prompts = [common.prompt_ids(tokenizer, m, preset["thinking"]) for m in messages]
    groups = generator.generate(prompts, n=s.samples, temperature=s.temperature, top_p=s.top_p,
                                max_tokens=s.max_new_tokens, seed=seed)
    flat = [x for g in groups for x in g]
    report = world.grade([x.text for x in flat], [g for g in golds for _ in range(s.samples)],
                         preset["think_in_prompt"])
    rows = [{"ids": x.token_ids, "text": x.text, "finish": x.finish_reason, "correct": c}
            for x, c in zip(flat, report.correct)]
    return [rows[i * s.samples:(i + 1) * s.samples] for i in range(len(messages))], report


def select_questions(world, generator, tokenizer, preset, pool: list[dict], s: Settings) -> dict:
    """Section 3, step 1: questions whose unguided samples have band_low..band_high correct."""
    kept, tried, timeouts, chunk = [], 0, 0, 64
    for start in range(0, min(len(pool), s.max_candidates), chunk):
        batch = pool[start:min(start + chunk, s.max_candidates)]
        groups, report = sample_and_grade(world, generator, tokenizer, preset,
                                          [p["prompt"] for p in batch], [p["gold"] for p in batch],
                                          s, seed=s.seed * 7919 + start)
        tried, timeouts = tried + len(batch), timeouts + report.timeouts + report.errors
        kept += [dict(p, none=g) for p, g in zip(batch, groups)
                 if s.band_low <= sum(r["correct"] for r in g) <= s.band_high]
        if len(kept) >= s.max_questions:
            break
    if not kept:
        raise ValueError(f"no question has {s.band_low}..{s.band_high} correct of {s.samples} "
                         f"samples among the {tried} tried: widen --band-low/--band-high or raise "
                         "--max-candidates")
    return {"questions": kept[:s.max_questions], "tried": tried, "grader_failures": timeouts}


def context_metrics(groups: list[list[dict]], tokenizer, preset) -> dict:
    """Accuracy (avg@samples), length, epistemic counts per response (paper mode per word and total,
    word mode total) and per 1k tokens of one context."""
    flat = [r for g in groups for r in g]
    if not flat:
        return {"questions": 0}
    return {"questions": len(groups), "accuracy": float(np.mean([r["correct"] for r in flat])),
            **common.response_metrics([r["text"] for r in flat], [len(r["ids"]) for r in flat],
                                      [r["finish"] for r in flat], tokenizer,
                                      preset["think_in_prompt"])}


def sft(base, tokenizer, data: list[tuple[list[int], list[int]]], steps: int, s: Settings):
    """A copy of the base fine-tuned on (prompt ids, response ids) for `steps` steps (deviation 1)
    -> (model, per-step losses, response tokens seen)."""
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.sft_lr, betas=(0.9, 0.999), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / s.sft_warmup))
    losses, tokens = [], 0
    bar = progress.bar(range(1, steps + 1), "SFT")
    for step in bar:
        batch = [data[i] for i in common.batch_indices(len(data), s.sft_batch_size, step, s.seed)]
        losses.append(lm_step(model, opt, batch, tokenizer.pad_token_id))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)  # on a terminal only
        tokens += sum(len(r) for _, r in batch)
        sched.step()
    return model.eval(), losses, tokens


def student(run: Path, name: str, base, tokenizer, data, steps: int, s: Settings, device: str):
    """The SFT student `name`, trained once and saved with its loss curve in <run>/students/<name>/
    (written under a temporary name, then renamed: resume loads only a complete student)."""
    path = run / "students" / name
    if not (path / "config.json").exists():
        model, losses, tokens = sft(base, tokenizer, data, steps, s)
        tmp = path.with_name(f".{name}.tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        common.write_json_atomic(tmp / "sft.json", {"examples": len(data), "steps": steps,
                                                    "tokens": tokens, "losses": losses})
        tmp.replace(path)
    return (common.load_model(str(path), device=device)[0],
            json.loads((path / "sft.json").read_text()))


def evaluate_model(world, generator, tokenizer, preset, sets: dict,
                   s: Settings) -> tuple[dict, dict]:
    """Flat metrics `eval/<set>/<metric>` (+ `eval_forced/<set>/<metric>` with budget forcing)
    and samples, with the world's evaluation sampling."""
    k, temp, top_p, max_tokens = world.eval_sampling(preset, s.eval_k, preset["max_new_tokens"])
    variants = [("eval", generator)] + (
        [("eval_forced", BudgetForcing(generator, tokenizer, world.FORCING_WORD))]
        if s.budget_forcing else [])
    metrics, samples = {}, {}
    for prefix, gen in variants:
        for name, problems in sets.items():
            if prefix == "eval_forced" and name == "train_graphs":
                continue
            m, rows = common.evaluate(gen, tokenizer, preset, problems, k, temp, top_p, max_tokens,
                                      s.seed, grade=world.grade)
            metrics.update({f"{prefix}/{name}/{key}": v for key, v in m.items()})
            samples[f"{prefix}_{name}"] = rows[:50]
    return metrics, samples


# ---------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------
def resolve(s: Settings, world, preset: dict) -> Settings:
    """Unset flags from the world's defaults; flags, backend and data files checked."""
    s = world_defaults(s, world.NAME)
    s = replace(s, max_new_tokens=s.max_new_tokens or preset["max_new_tokens"])
    if not 0 <= s.band_low <= s.band_high <= s.samples:
        raise ValueError(f"--band-low {s.band_low} / --band-high {s.band_high}: need 0 <= low <= "
                         "high <= --samples")
    if (min(s.samples, s.max_questions, s.max_candidates, s.sft_batch_size, s.sft_warmup) < 1
            or s.sft_epochs <= 0):
        raise ValueError("--samples, --max-questions, --max-candidates, --sft-batch-size, "
                         "--sft-warmup and --sft-epochs must be positive")
    if s.backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"--backend {s.backend!r}: use auto, hf or vllm")
    if s.backend == "vllm":
        from infra.rollout import check_vllm

        check_vllm(live=False)
    world.check_files(s.train_file, s.data_dir, s.eval_sets.split(","))
    return s


def plan_seed(s: Settings) -> tuple[Settings, str]:
    """Every check that can fail, before anything is loaded: flags, backend, data files and the
    run directory (-> "new", "continue" or "finished")."""
    s = resolve(s, common.pick_world(s.model), common.resolve_preset(s.model))
    return s, run_dirs.check_run(Path(s.out_dir) / f"seed{s.seed}", s, s.overwrite, s.resume,
                                 Settings.SWEEP_ONLY)


def sft_sets(questions: list[dict], groups: dict, tokenizer, preset: dict) -> dict[str, list]:
    """Section 4's two SFT sets, (prompt ids, response ids) without any hint in the prompt:
    D_ug = each question's first correct unguided response (context none), D_sg = its first
    correct solution-guided response (context s: the peer solution with its thinking)."""
    def firsts(gs):
        pairs = [(q, next((r for r in g or [] if r["correct"]), None))
                 for q, g in zip(questions, gs)]
        return [(common.prompt_ids(tokenizer, q["prompt"], preset["thinking"]), r["ids"])
                for q, r in pairs if r]

    return {"D_ug": firsts(groups["none"]), "D_sg": firsts(groups["s"])}


def first_correct_text(group: list[dict] | None) -> str | None:
    return next((r["text"] for r in group or [] if r["correct"]), None)


def run_seed(s: Settings) -> dict:
    s, state = plan_seed(s)
    if state == "finished":
        return run_dirs.read_final(Path(s.out_dir) / f"seed{s.seed}")
    parallel.cpu_threads(s.threads)
    common.set_seed(s.seed)
    device = s.device or common.default_device()
    world = common.pick_world(s.model)  # data before the model: a bad file fails before loading
    sets = world.evaluation_sets(s.eval_n, s.eval_sets.split(","), s.data_dir)
    pool = world.training_problems(s.max_candidates, s.train_file)
    pool = random.Random(s.seed).sample(pool, len(pool))
    base, tokenizer, preset = common.load_model(s.model, device=device)
    run = run_dirs.start_run(Path(s.out_dir) / f"seed{s.seed}", s, overwrite=s.overwrite,
                           resume=s.resume, sweep_only=Settings.SWEEP_ONLY)
    if state == "continue":
        print(f"{run}: resumed, {run_state(run)} (skipped)", flush=True)
    try:
        return _run_seed(s, world, run, base, tokenizer, preset, sets, pool, device)
    except KeyboardInterrupt:
        raise Interrupted(run) from None


def _run_seed(s: Settings, world, run: Path, base, tokenizer, preset, sets, pool, device) -> dict:
    generator = make_generator(base, tokenizer, s.backend, model_path=preset["hub_id"], seed=s.seed)

    # Section 3: selection, then each teacher context (paper Table 1). groups[c][i]: the samples of
    # question i under context c, or None when c has no solution to show for it.
    sel = stage(run, "selection",
                lambda: select_questions(world, generator, tokenizer, preset, pool, s))
    questions = sel["questions"]
    groups = {"none": [q["none"] for q in questions]}
    for c in CONTEXTS[1:]:
        # round 2 is conditioned on a round-1 guided answer
        source = groups["s" if c == "regenerated" else "none"]
        msgs = [context_message(q["prompt"], c, first_correct_text(g), preset["think_in_prompt"])
                for q, g in zip(questions, source)]
        idx = [i for i, m in enumerate(msgs) if m is not None]

        def sample_context(msgs=msgs, idx=idx, c=c):
            out, _ = sample_and_grade(world, generator, tokenizer, preset, [msgs[i] for i in idx],
                                      [questions[i]["gold"] for i in idx], s,
                                      seed=s.seed * 7919 + 1 + CONTEXTS.index(c))
            by_question = dict(zip(idx, out))
            return [by_question.get(i) for i in range(len(questions))]

        groups[c] = stage(run, f"context_{c}", sample_context)
    table1 = {c: context_metrics([g for g in gs if g is not None], tokenizer, preset)
              for c, gs in groups.items()}
    run_dirs.write_samples(run, "contexts",
                           [{"question": i, "context": c, "response": r["text"],
                             "correct": r["correct"]}
                            for c, gs in groups.items() for i, g in enumerate(gs[:20])
                            for r in g or []])

    # Section 4: the two SFT sets, the students and their evaluation (paper Table 2)
    data = sft_sets(questions, groups, tokenizer, preset)
    steps = max(1, round(s.sft_epochs * len(data["D_ug"]) / s.sft_batch_size))
    # the toy world also evaluates the graphs distilled on, without a hint
    if world.EVAL_SELECTED_AS:
        sets[world.EVAL_SELECTED_AS] = [{"prompt": q["prompt"], "gold": q["gold"]}
                                        for q in questions]
    table2, losses = {}, {}
    for name in ("base", "D_ug", "D_sg"):
        model, info = base, {}
        if name != "base":
            if not data[name]:
                raise ValueError(f"{name} is empty: no correct response to distil from")
            model, info = student(run, name, base, tokenizer, data[name], steps, s, device)
            path = str(run / "students" / name)
            del generator  # one engine at a time (vLLM holds GPU memory)
            generator = make_generator(model, tokenizer, s.backend, model_path=path, seed=s.seed)

        def evaluate(generator=generator, name=name):
            m, samples = evaluate_model(world, generator, tokenizer, preset, sets, s)
            for key, rows in samples.items():
                run_dirs.write_samples(run, f"{name}_{key}", rows)
            return m

        table2[name] = dict(stage(run, f"eval_{name}", evaluate),
                            **{f"sft/{k}": v for k, v in info.items() if k != "losses"})
        losses[name] = info.get("losses", [])
    common.write_json_atomic(run / "metrics.jsonl", "".join(  # one line per SFT step, both students
        json.dumps({"step": i + 1,
                    **{f"sft/{n}/loss": l[i] for n, l in losses.items() if i < len(l)}}) + "\n"
        for i in range(steps)))
    final = {"seed": s.seed, "model": s.model, "world": world.NAME, "settings": asdict(s),
             "selection": {"questions": len(questions), "tried": sel["tried"],
                           "band": [s.band_low, s.band_high],
                           "grader_failures": sel["grader_failures"]},
             "table1": table1, "table2": table2}
    run_dirs.finish_run(run, final)
    return final


# ---------------------------------------------------------------------------------------------
# Tables over seeds
# ---------------------------------------------------------------------------------------------
def summarize(finals: list[dict]) -> dict:
    """Table 1 and Table 2, every metric as {mean, std, n} over seeds."""
    def stats(dicts: list[dict]) -> dict:
        return {k: tables.stat([d.get(k) for d in dicts])
                for k in dict.fromkeys(k for d in dicts for k in d)
                if not isinstance(dicts[0].get(k), (list, dict, str))}

    table1 = [{"context": c, "seeds": len(finals), **stats([f["table1"][c] for f in finals])}
              for c in finals[0]["table1"]]
    table2 = [{"model": name, "seeds": len(finals), **stats([f["table2"][name] for f in finals])}
              for name in finals[0]["table2"]]
    return {"table1": table1, "table2": table2}


CONTEXT_LABELS = {"none": "unguided", "s": "c = s", "s_nothink": "c = s\\think",
                  "regenerated": "c = regenerated"}
TABLE1 = {"accuracy": 3, "response_length": 1, "epistemic/total": 2,
          "epistemic/total_per_1k_tokens": 1}


def print_summary(finals: list[dict], out_dir: str, world) -> None:
    """Both tables in <= 100 columns; every metric in summary.json."""
    t1 = [{"context": CONTEXT_LABELS.get(c, c), "seeds": len(finals),
           **{k.replace("epistemic/total", "doubt words").replace("response_", ""):
              tables.fmt_stat(tables.stat([f["table1"][c].get(k) for f in finals]), d)
              for k, d in TABLE1.items()}}
          for c in finals[0]["table1"]]
    print("Table 1 - teacher context richness (section 3); doubt words and length per response\n"
          + tables.format_table(t1))
    print("\nTable 2 - off-policy SFT on D_ug vs D_sg (section 4)\n"
          + tables.compact_table([(name, [f["table2"][name] for f in finals])
                                  for name in finals[0]["table2"]], world, first="model"))
    print(f"every metric (mean, std, n over seeds): {out_dir}/summary.json")


def main(argv=None) -> dict:
    s = parse_settings(Settings, argv)
    s = replace(s, out_dir=run_dirs.default_out_dir(s.out_dir, s.model))
    seeds = [int(x) for x in s.seeds.split(",")] if s.seeds else [s.seed]
    for seed in seeds:  # every run directory checked before the first model loads
        plan_seed(replace(s, seed=seed))
    finals = [run_seed(replace(s, seed=seed)) for seed in progress.bar(seeds, "exp01 seeds")]
    summary = summarize(finals)
    common.write_json_atomic(Path(s.out_dir) / "summary.json", summary)
    print_summary(finals, s.out_dir, common.pick_world(s.model))
    return summary


if __name__ == "__main__":
    cli(main)
