"""Checkpoints: atomic save of a run's training state, load of the newest one, and the trainer
state a resume needs (weights, optimizer, scheduler, EMA shadows, torch RNG) across shards.

Infrastructure only (the science is in the experiments, common.py and the worlds)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

import common
from infra import parallel


def save_checkpoint(run: Path, step: int, state: dict, keep: int = 1) -> None:
    """torch.save(state) into checkpoints/step_XXXXXX/ through a temporary directory and a rename
    (atomic); only the newest `keep` checkpoints stay (the release keeps all, ~100 GB each at
    8B)."""
    root = Path(run) / "checkpoints"
    tmp, final = root / f".tmp_step_{step:06d}", root / f"step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, **state}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old)


def load_checkpoint(run: Path) -> tuple[int, dict]:
    """(step, state) of the newest checkpoint; metrics.jsonl is cut back to that step so that the
    continued run appends exactly the steps that follow. A run that stopped before its first
    checkpoint has nothing to continue: (0, {}) with its metrics cleared, and it starts again."""
    found = sorted((Path(run) / "checkpoints").glob("step_*"))
    if not found:
        print(f"--resume: {run} has no checkpoint yet; starting it again from step 0", flush=True)
        Path(run, "metrics.jsonl").unlink(missing_ok=True)
        return 0, {}
    state = torch.load(found[-1] / "state.pt", weights_only=False)
    rows = [r for r in common.read_metrics(run) if r["step"] <= state["step"]]
    common.write_json_atomic(
        Path(run) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
    )
    return state["step"], state


def save_state(run, step, student, opt, sched, teacher_fp32, keep: int) -> None:
    """Everything a resume needs, gathered whole from the shards (the frozen teacher is the loaded
    model and the EMA teacher's weights are its fp32 shadows: neither is saved separately)."""
    state = dict(
        parallel.gather_full_state(student, opt), teacher_fp32=parallel.gather_tensors(teacher_fp32)
    )
    if parallel.is_main():
        save_checkpoint(
            run,
            step,
            {
                "student": state["model"],
                "optimizer": state["optimizer"],
                "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "teacher_fp32": state["teacher_fp32"],
            },
            keep,
        )


def load_state(run, student, opt, sched, teacher, teacher_fp32) -> int:
    """Restore the newest checkpoint -> the step to continue after. Rank 0 reads it; the weights
    and optimizer state reach the other ranks' shards by broadcast."""
    full = {}

    def read():  # rank 0 keeps the (large) state; every rank gets the small parts
        step, full["state"] = load_checkpoint(run)
        if step == 0:  # no checkpoint yet: the run starts again
            return 0, None, None
        return step, full["state"]["scheduler"], full["state"]["torch_rng"]

    step, sched_state, rng = parallel.main_only(read)
    if step == 0:
        return 0
    state = full.get("state", {})
    parallel.load_full_state(
        student, opt, {"model": state.get("student", {}), "optimizer": state.get("optimizer", {})}
    )
    sched.load_state_dict(sched_state)
    torch.set_rng_state(rng)
    parallel.scatter_tensors(teacher_fp32, state.get("teacher_fp32"))
    with torch.no_grad():
        for p, shadow in zip(teacher.parameters() if teacher_fp32 else [], teacher_fp32):
            p.copy_(shadow)
    return step
