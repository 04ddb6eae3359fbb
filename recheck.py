"""Re-check runs: run each run directory again, with the settings of its own config.json and the
script that made it, into a temporary directory, and compare the fresh final.json with its own.

  python recheck.py results/exp02/grpo/seed0                    # exit 0: identical; 1: not
  python recheck.py results/exp04/cov1/sdpo_s/seed0 results/exp03/ema0.05/seed1

Every value of final.json is compared exactly, except the time fields (`time/*`, `train_time_s`)
and the settings that say how a sweep was launched rather than what a run computes (SWEEP_ONLY:
out_dir, seeds, resume, overwrite, wandb, ...). Each differing value is printed with both values.
A run made at another commit than HEAD, from a dirty tree, or with other package versions is
warned about: a difference may then come from the code, not from the run. exp02, exp03 and exp04
runs go through exp02.train_arm (exp04 with its coverage's training set), exp01 runs through
exp01.run_seed.
"""
import argparse
import importlib
import json
import sys
import tempfile
from dataclasses import fields, replace
from pathlib import Path

import exp02_onpolicy_grpo_sdpo as exp02
from infra import run_dirs
from infra.settings import cli

SCRIPTS = ("exp01_offpolicy", "exp02_onpolicy_grpo_sdpo", "exp03_ema_teacher", "exp04_coverage")


def script_of(config: dict):
    """The module of the script named in config.json; for a run written before the name was
    recorded, the script whose settings hold every saved field with the fewest others."""
    if config.get("script"):
        return importlib.import_module(Path(config["script"]).stem)
    saved = set(config["settings"])
    fits = [m for m in map(importlib.import_module, SCRIPTS)
            if saved <= {f.name for f in fields(m.Settings)}]
    if not fits:
        raise ValueError(f"no script has all the settings {sorted(saved)}")
    return min(fits, key=lambda m: len(fields(m.Settings)))


def settings_of(script, saved: dict):
    """The run's settings (fields added since: their defaults), started afresh, no W&B."""
    names = {f.name for f in fields(script.Settings)}
    s = script.Settings(**{k: v for k, v in saved.items() if k in names})
    return replace(s, resume=False, overwrite=False, **({"wandb": ""} if "wandb" in names else {}))


def rerun(script, s, run: Path, out: Path) -> Path:
    """The run made again by its script's function for one run -> the fresh run directory."""
    if script.__name__ == "exp01_offpolicy":  # one seed: <out_dir>/seed<k>/
        script.run_seed(replace(s, out_dir=str(out)))
        return out / f"seed{s.seed}"
    if script.__name__ == "exp04_coverage":  # <out_dir>/<coverage>/<arm>/seed<k>/
        script.train_coverage(s, str(out), run.resolve().parent.parent.name)
    else:  # exp02, exp03: one arm, one seed
        exp02.train_arm(s, str(out))
    return out


def flat(d: dict, prefix: str = "") -> dict:
    """Nested dicts -> {"final/train/reward": value, ...}."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def compared(key: str, sweep_only: tuple) -> bool:
    """Not a time field, nor a setting of the sweep rather than of the run."""
    return not ("/time/" in f"/{key}" or key.endswith("train_time_s")
                or key.startswith("settings/") and key[len("settings/"):] in sweep_only)


def differences(old: dict, new: dict, sweep_only: tuple) -> tuple[int, list[str]]:
    """(values compared, "key: run X, re-run Y" per differing value); NaN equals NaN."""
    a, b = flat(old), flat(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if compared(k, sweep_only)]
    same = lambda x, y: x == y or x != x and y != y  # noqa: E731
    return len(keys), [f"{k}: run {a.get(k, '(absent)')}, re-run {b.get(k, '(absent)')}"
                       for k in keys if not same(a.get(k), b.get(k))]


def provenance_warnings(run: Path, config: dict) -> list[str]:
    """What besides the run may make the re-run differ: commit, uncommitted changes, CPU,
    packages."""
    now, out = run_dirs.environment_info(), []
    if config.get("git_commit") != now["git_commit"]:
        out.append(f"made at commit {config.get('git_commit')}, HEAD is {now['git_commit']}")
    if config.get("git_dirty"):
        out.append("made from a tree with uncommitted changes")
    if now["git_dirty"]:
        out.append("this tree has uncommitted changes")
    if config.get("cpu", now["cpu"]) != now["cpu"]:  # older runs did not record it
        out.append(f"made on {config['cpu']}, this is {now['cpu']}")
    then = config.get("packages", {})
    out += [f"{p} {then[p]} then, {v} now" for p, v in now["packages"].items()
            if p in then and then[p] != v]
    return [f"warning: {run}: {w}" for w in out]


def recheck(run: Path) -> bool:
    """Re-run one run directory and print what differs -> identical?"""
    config = json.loads((run / "config.json").read_text())
    final = json.loads((run / "final.json").read_text())
    script = script_of(config)
    for line in provenance_warnings(run, config):
        print(line, file=sys.stderr)
    print(f"{run}: re-running with {script.__name__}.py and its config.json", flush=True)
    with tempfile.TemporaryDirectory(prefix="recheck-") as tmp:
        s = settings_of(script, config["settings"])
        fresh = rerun(script, s, run, Path(tmp) / "run")
        new = json.loads((fresh / "final.json").read_text())
    n, diffs = differences(final, new, type(s).SWEEP_ONLY)
    if not diffs:
        print(f"{run}: identical ({n} values; time fields and sweep-only settings aside)")
        return True
    print(f"{run}: {len(diffs)} of {n} values differ\n  " + "\n  ".join(diffs))
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a run directory holding config.json and final.json")
    runs = parser.parse_args(argv).runs
    for run in runs:  # every directory checked before the first re-run
        if not (run / "config.json").is_file() or not (run / "final.json").is_file():
            raise FileNotFoundError(f"{run}: no config.json and final.json (a finished run?)")
    results = [recheck(run) for run in runs]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(cli(main))
