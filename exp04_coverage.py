"""exp04 — task coverage decides the sign (claim C5; docs/PROTOCOL.md §6).

Claim C5: with very few training questions, suppressing epistemic verbalization gives fast
in-domain gains and short answers; as coverage broadens, out-of-distribution performance falls.

The sweep trains GRPO and SDPO (c = s) with exp02's trainer (`train_arm`, imported, never copied) on
training sets of different coverage, with the same seeds, budgets and evaluation:
  toy world:  1, 8, 64, 256 training graphs of the in-domain slice, and fresh graphs every step;
  math world: subsets of 1, 8, 64, 128, 512 questions drawn from DAPO-Math-17k with the seed, or the
              the release's own files with --train-files (seen_*.parquet, README "Data").
A training set smaller than the batch is cycled through; a repeated row is its own group, as in the
release (seen_1x64.parquet is one question 64 times). Tracked: in-domain training score
(`train/reward`), response length and OOD accuracy (toy: held-out and OOD cells; math: AIME24
avg@16).

  python exp04_coverage.py                              # toy world, one seed
  python exp04_coverage.py --seeds 0,1,2                # the README's table (mean ± std)
  python exp04_coverage.py --model qwen3-8b-nothink --prompts-per-step 64 \\
      --train-files COVERAGE_DIR/seen_1x64.parquet,COVERAGE_DIR/seen_64.parquet

Where we depart from the paper: exp02's list applies; the toy world adds the "fresh graphs every
step" arm (unbounded coverage) and uses 256 rather than 512 as its largest fixed set.
"""

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import common
from infra import progress, run_dirs, tables
import exp02_onpolicy_grpo_sdpo as exp02
from infra.settings import arg, cli, parse_settings


@dataclass
class Settings(exp02.Settings):
    out_dir: str = arg("runs/{model}/exp04", "run directory ({model} = the --model name); each "
                                             "coverage, arm and seed writes "
                                             "<out_dir>/<coverage>/<arm>/seed<k>/")
    method: str = arg("all", "grpo | sdpo | all (GRPO and SDPO with --teacher-context)")
    coverages: str = arg("1,8,64,256,fresh", "training-set sizes drawn with the seed; `fresh` = "
                                             "new toy graphs every step")
    train_files: str = arg("", "math: comma-separated parquet files in the paper's layout, one "
                               "coverage arm each (overrides --coverages)")

    SWEEP_ONLY: ClassVar[tuple] = exp02.Settings.SWEEP_ONLY + ("coverages", "train_files")


def coverage_names(s: Settings, world) -> list[str]:
    """The coverage arms' names, checked without loading any data."""
    if s.train_files:
        return [Path(f).stem for f in s.train_files.split(",")]
    names = [c.strip() for c in s.coverages.split(",") if c.strip()]
    for name in names:
        if name == "fresh" and not hasattr(world, "fresh_problems"):
            raise ValueError("--coverages fresh exists only in the toy world "
                             "(new graphs every step)")
        if name != "fresh" and (not name.isdigit() or int(name) < 1):
            raise ValueError(f"--coverages: {name!r} is not a positive number of questions "
                             "or 'fresh'")
    if not names:
        raise ValueError("no coverage to run: give --coverages (e.g. 1,8,64) or --train-files")
    return [n if n == "fresh" else f"cov{int(n)}" for n in names]


def training_sets(s: Settings, world) -> dict[str, list[dict] | None]:
    """Coverage name -> training problems (None = fresh graphs every step)."""
    if s.train_files:
        return {Path(f).stem: world.training_problems(0, f) for f in s.train_files.split(",")}
    names = coverage_names(s, world)
    sizes = [int(n[3:]) for n in names if n != "fresh"]
    pool = world.training_problems(max(sizes + [0]), s.train_file)
    sets = {}
    for name, size in ((n, int(n[3:]) if n != "fresh" else None) for n in names):
        if size is not None and size > len(pool):
            raise ValueError(f"--coverages {size}: the training pool has only {len(pool)} "
                             "questions")
        sets[name] = (None if size is None
                      else random.Random(f"coverage-{s.seed}").sample(pool, size))
    return sets


def batches(world, problems: list[dict] | None, batch: int, seed: int):
    """sample_batch(step) -> the step's problems: seeded epochs over a fixed set (as exp02 does), or
    the world's fresh problems at every step, seeded by (seed, step), when `problems` is None."""
    if problems is None:
        return lambda step: world.fresh_problems(seed, step, batch)
    return lambda step: [problems[i]
                         for i in common.batch_indices(len(problems), batch, step, seed)]


def train_coverage(arm: Settings, run_dir: str, name: str, sets: dict | None = None) -> dict:
    """One (coverage, arm, seed) run -> its final.json contents, with `arm` and `coverage` added.
    `sets`: the seed's training_sets (drawn here when not given: recheck.py re-runs one run)."""
    world = common.pick_world(arm.model)
    problems = (sets or training_sets(arm, world))[name]
    batch = exp02.resolve(arm, world).prompts_per_step
    final = exp02.train_arm(arm, run_dir, sample_batch=batches(world, problems, batch, arm.seed))
    return dict(final, arm=f"{name}/{exp02.arm_name(arm)}", coverage=name)


def main(argv=None) -> list[dict]:
    s = parse_settings(Settings, argv)
    s = replace(s, out_dir=run_dirs.default_out_dir(s.out_dir, s.model))
    if s.method not in ("grpo", "sdpo", "all"):
        raise ValueError(f"--method {s.method!r}: use grpo, sdpo or all")
    methods = ([("grpo", "s"), ("sdpo", s.teacher_context)] if s.method == "all"
               else [(s.method, s.teacher_context)])
    seeds = [int(x) for x in s.seeds.split(",")] if s.seeds else [s.seed]
    world = common.pick_world(s.model)
    for f in s.train_files.split(",") if s.train_files else []:
        if not Path(f).exists():
            raise FileNotFoundError(f"--train-files: {f} does not exist")
    runs = [(replace(s, seed=seed, method=m, teacher_context=c), name)
            for seed in seeds for name in coverage_names(s, world) for m, c in methods]
    runs = [(a, f"{s.out_dir}/{name}/{exp02.arm_name(a)}/seed{a.seed}", name) for a, name in runs]
    for arm, run_dir, _ in runs:  # every run directory checked before any data or model loads
        exp02.plan_arm(arm, run_dir)
    sets = {seed: training_sets(replace(s, seed=seed), world) for seed in seeds}
    finals = [train_coverage(arm, run_dir, name, sets[arm.seed])
              for arm, run_dir, name in progress.bar(runs, "exp04 runs")]
    tables.report(finals, s.out_dir, world, exp02.arm_name)
    return finals


if __name__ == "__main__":
    cli(main)
