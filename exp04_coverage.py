"""exp04 — task coverage decides the sign (claim C5; PAPER.md §6).

Claim C5: with very few training questions, suppressing epistemic verbalization gives fast
in-domain gains and short answers; as coverage broadens, out-of-distribution performance falls.

The sweep trains GRPO and SDPO (c = s) with exp02's trainer (`train_arm`, imported, never copied) on
training sets of different coverage, with the same seeds, budgets and evaluation:
  toy world:  1, 8, 64, 256 training graphs of the in-domain slice, and fresh graphs every step;
  math world: subsets of 1, 8, 64, 128, 512 questions drawn from DAPO-Math-17k with the seed, or the
              paper's own files with --train-files (../shared/data/paper/coverage/seen_*.parquet).
A training set smaller than the batch is cycled through; a repeated row is its own group, as in the
release (seen_1x64.parquet is one question 64 times). Tracked: in-domain training score
(`train/reward`), response length and OOD accuracy (toy: held-out and OOD cells; math: AIME24 avg@16).

  python exp04_coverage.py                              # toy world, one seed
  python exp04_coverage.py --seeds 0,1,2                # the README's table (mean ± std)
  python exp04_coverage.py --model qwen3-8b-nothink --prompts-per-step 64 \\
      --train-files ../shared/data/paper/coverage/seen_1x64.parquet,../shared/data/paper/coverage/seen_64.parquet

Where we depart from the paper: exp02's list applies; the toy world adds the "fresh graphs every
step" arm (unbounded coverage) and uses 256 rather than 512 as its largest fixed set.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import common
import exp02_onpolicy_grpo_sdpo as exp02


@dataclass
class Settings(exp02.Settings):
    out_dir: str = "runs/{model}/exp04"
    """run directory ({model} = the --model name); each coverage, arm and seed writes
    <out_dir>/<coverage>/<arm>/seed<k>/"""
    method: str = "all"
    """grpo | sdpo | all (all = GRPO and SDPO with --teacher-context)"""
    coverages: str = "1,8,64,256,fresh"
    """training-set sizes (questions or graphs) drawn with the seed; `fresh` = new toy graphs every step"""
    train_files: str = ""
    """math: comma-separated parquet files in the paper's layout, one coverage arm each (overrides --coverages)"""

    SWEEP_ONLY: ClassVar[tuple] = exp02.Settings.SWEEP_ONLY + ("coverages", "train_files")


def coverage_names(s: Settings, world: str) -> list[str]:
    """The coverage arms' names, checked without loading any data."""
    if s.train_files:
        return [Path(f).stem for f in s.train_files.split(",")]
    names = [c.strip() for c in s.coverages.split(",") if c.strip()]
    for name in names:
        if name == "fresh" and world != "toy":
            raise ValueError("--coverages fresh exists only in the toy world (new graphs every step)")
        if name != "fresh" and (not name.isdigit() or int(name) < 1):
            raise ValueError(f"--coverages: {name!r} is not a positive number of questions or 'fresh'")
    if not names:
        raise ValueError("no coverage to run: give --coverages (e.g. 1,8,64) or --train-files")
    return [n if n == "fresh" else f"cov{int(n)}" for n in names]


def training_sets(s: Settings, preset: dict) -> dict[str, list[dict] | None]:
    """Coverage name -> training problems (None = fresh toy graphs every step)."""
    if s.train_files:
        return {Path(f).stem: common.load_train_problems(f) for f in s.train_files.split(",")}
    names = [c.strip() for c in s.coverages.split(",") if c.strip()]
    if preset["world"] == "toy":
        import toy_world

        pool = toy_world.cell_problems(toy_world.SLICE, max([int(c) for c in names if c != "fresh"] + [0]), split="train")
    else:
        pool = common.load_train_problems(s.train_file)
    sets = {}
    for name in names:
        if name == "fresh":
            if preset["world"] != "toy":
                raise ValueError("--coverages fresh exists only in the toy world (new graphs every step)")
            sets[name] = None
            continue
        if not name.isdigit() or int(name) < 1:
            raise ValueError(f"--coverages: {name!r} is not a positive number of questions or 'fresh'")
        if int(name) > len(pool):
            raise ValueError(f"--coverages {name}: the training pool has only {len(pool)} questions")
        sets[f"cov{int(name)}"] = random.Random(f"coverage-{s.seed}").sample(pool, int(name))
    if not sets:
        raise ValueError("no coverage to run: give --coverages (e.g. 1,8,64) or --train-files")
    return sets


def batches(problems: list[dict] | None, batch: int, seed: int):
    """sample_batch(step) -> the step's problems: seeded epochs over a fixed set (as exp02 does), or
    new graphs of the in-domain slice at every step, seeded by (seed, step), when `problems` is None."""
    import toy_world

    def fresh(step: int) -> list[dict]:
        rng = random.Random(f"fresh-{seed}-{step}")
        graphs = [toy_world.make_graph(rng, *toy_world.SLICE) for _ in range(batch)]
        return [{"prompt": toy_world.graph_prompt(g), "gold": g.answer} for g in graphs]

    if problems is None:
        return fresh
    return lambda step: [problems[i] for i in common.batch_indices(len(problems), batch, step, seed)]


def main(argv=None) -> list[dict]:
    s = common.parse_settings(Settings, argv)
    s = replace(s, out_dir=common.default_out_dir(s.out_dir, s.model))
    if s.method not in ("grpo", "sdpo", "all"):
        raise ValueError(f"--method {s.method!r}: use grpo, sdpo or all")
    arms = [("grpo", "s"), ("sdpo", s.teacher_context)] if s.method == "all" else [(s.method, s.teacher_context)]
    seeds = [int(x) for x in s.seeds.split(",")] if s.seeds else [s.seed]
    preset = common.resolve_preset(s.model)
    batch = s.prompts_per_step or exp02.WORLD_DEFAULTS[preset["world"]]["prompts_per_step"]
    for f in s.train_files.split(",") if s.train_files else []:
        if not Path(f).exists():
            raise FileNotFoundError(f"--train-files: {f} does not exist")
    names = coverage_names(s, preset["world"])
    runs = [(replace(s, seed=seed), method, context, f"{s.out_dir}/{name}/{exp02.arm_name(method, context)}/seed{seed}")
            for seed in seeds for name in names for method, context in arms]
    for run in runs:  # every run directory checked before any data or model loads
        exp02.plan_arm(*run)
    finals = []
    for seed in seeds:
        for name, problems in training_sets(replace(s, seed=seed), preset).items():
            for method, context in arms:
                arm = exp02.arm_name(method, context)
                f = exp02.train_arm(replace(s, seed=seed), method, context, f"{s.out_dir}/{name}/{arm}/seed{seed}",
                                    sample_batch=batches(problems, batch, seed))
                finals.append(dict(f, arm=f"{name}/{arm}", coverage=name))
    common.write_json_atomic(f"{s.out_dir}/summary.json", exp02.summarize(finals))
    exp02.print_summary(finals, s.out_dir, {})
    return finals


if __name__ == "__main__":
    common.cli(main)
