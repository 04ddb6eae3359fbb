"""Run directories: the refuse / resume / overwrite policy, decided before anything loads,
config.json's provenance (settings, commit, versions), and the files a run writes into its
directory (metrics.jsonl, samples/, final.json).
Infrastructure only (the science is in the experiments, common.py and the worlds)."""
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from common import PRESETS, ROOT, write_json_atomic
from infra import progress


def environment_info() -> dict:
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = bool(  # the code's state: results/ is what the runs write (reproduce_toy.sh)
            subprocess.run(
                ["git", "status", "--porcelain", "--", ".", ":(exclude)results"], cwd=ROOT,
                capture_output=True, text=True
            ).stdout
        )
    except OSError:
        commit, dirty = None, None
    return {
        "git_commit": commit or None,
        "git_dirty": dirty,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_info(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "packages": {
            p: version(p)
            for p in ("torch", "transformers", "datasets", "numpy", "math-verify", "vllm")
        },
    }


def cpu_info() -> str:
    """The CPU and the vector kernels torch runs on it, e.g. "AMD EPYC (family 25 model 1), torch
    AVX2": the toy runs are bit-exact across hosts only as far as their kernels agree (README,
    "Exactness"), and a host's speed follows them."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    kind = f" (family {fields['cpu family']} model {fields['model']})" if "model" in fields else ""
    return f"{name}{kind}, torch {torch.backends.cpu.get_cpu_capability()}"


def script_of(settings) -> str:
    """The file of the script whose settings class this is (recheck.py re-runs the run with it);
    None where the class was defined interactively."""
    file = getattr(sys.modules.get(type(settings).__module__), "__file__", None)
    return Path(file).name if file else None


def model_slug(name: str) -> str:
    """A directory name for a model: the preset name, or the hub id / path with / -> _."""
    return (
        name if name in PRESETS else re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    )


def default_out_dir(out_dir: str, model: str) -> str:
    """`{model}` in a default --out-dir becomes the model's slug, so the runs of two models (the
    toy and an 8B) never share a directory."""
    return out_dir.replace("{model}", model_slug(model))


def check_run(out_dir: str | Path, settings, overwrite: bool = False, resume: bool = False,
              sweep_only: tuple = ()) -> str:
    """What may be done with a run directory, decided before anything is loaded or written:
    "new" (start it), "continue" (resume an unfinished run with the same settings) or "finished"
    (under --resume, a finished run with the same settings: reuse its final.json). Refuses
    (FileExistsError / ValueError naming the fix) a finished run without --resume or --overwrite,
    an unfinished one without --resume or --overwrite, and --resume with other settings than the
    run's (`sweep_only` fields say how a sweep is launched, not what a run computes)."""
    run = Path(out_dir)
    if overwrite or not (run / "config.json").exists():
        return "new"
    finished = (run / "final.json").exists()
    if not resume:
        if finished:
            raise FileExistsError(
                f"{run} holds a finished run (final.json): pass --resume to reuse it, "
                "--overwrite to replace it, or choose another --out-dir"
            )
        raise FileExistsError(
            f"{run} holds an unfinished run: pass --resume to continue it or --overwrite to restart"
        )
    saved = json.loads((run / "config.json").read_text())["settings"]
    now = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    changed = [f"--{k.replace('_', '-')} (run: {saved[k]}, now: {now[k]})" for k in now
               if k in saved and k not in sweep_only and saved[k] != now[k]]
    if changed:
        raise ValueError(
            f"--resume with other settings than the {'finished' if finished else 'unfinished'} "
            f"run in {run}: {'; '.join(changed)}. Resume with the same flags, or choose "
            "another --out-dir, or pass --overwrite"
        )
    return "finished" if finished else "continue"


def start_run(out_dir: str | Path, settings, overwrite: bool = False, resume: bool = False,
              sweep_only: tuple = ()) -> Path:
    """Create a run directory and write config.json (settings, script, commit, versions), after
    `check_run`: a run to continue is returned as it is; --overwrite clears the old run's files."""
    run = Path(out_dir)
    state = check_run(run, settings, overwrite, resume, sweep_only)
    if state == "finished":
        raise FileExistsError(f"{run} holds a finished run (final.json): nothing to continue")
    if state == "continue":
        return run
    if overwrite and run.exists():
        for name in ("metrics.jsonl", "final.json", "samples", "checkpoints", "stages", "students"):
            path = run / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run / "config.json",
        {"settings": dataclasses.asdict(settings), "script": script_of(settings),
         **environment_info()},
    )
    return run


def read_final(out_dir: str | Path) -> dict:
    """The final.json of a finished run that --resume reuses (checked by check_run)."""
    progress.say(f"{out_dir}: finished earlier with the same settings, reused (--resume)")
    return json.loads((Path(out_dir) / "final.json").read_text())


def log_metrics(run: Path, step: int, metrics: dict) -> None:
    """Append one flat JSON line to metrics.jsonl and fsync: metrics written survive a crash."""
    with open(Path(run) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_samples(run: Path, name: str, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    write_json_atomic(Path(run) / "samples" / f"{name}.jsonl", text)


def finish_run(run: Path, final: dict) -> None:
    write_json_atomic(Path(run) / "final.json", final)
