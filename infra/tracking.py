"""Optional experiment tracking (--wandb PROJECT): every metrics row a run appends to its
metrics.jsonl is mirrored to a Weights & Biases run. The files stay the source of truth and
nothing needs wandb; WANDB_MODE=offline keeps the W&B run on disk (`wandb sync` uploads it later).
Infrastructure only (the science is in the experiments, common.py and the worlds)."""
from __future__ import annotations

from pathlib import Path

from infra import parallel, run_dirs
from infra.hub import SetupError


def check(project: str) -> None:
    """--wandb PROJECT without the wandb package: refused before anything loads."""
    if not project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise SetupError(f"--wandb {project} needs the wandb package: pip install wandb (or leave "
                         "out --wandb: metrics.jsonl holds every metric either way)") from None


class Metrics:
    """The run's metrics log: rank 0 appends each row to <run>/metrics.jsonl (run_dirs.log_metrics)
    and, given a W&B project, logs the same row at the same step to a W&B run named after the run
    directory, with the settings as its config. Other ranks: nothing."""

    def __init__(self, run: Path, project: str = "", config: dict | None = None):
        self.run, self.wandb = run, None
        if project and parallel.is_main():
            import wandb

            self.wandb = wandb.init(project=project, name=str(run), config=config)

    def log(self, step: int, row: dict) -> None:
        if parallel.is_main():
            run_dirs.log_metrics(self.run, step, row)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def finish(self) -> None:
        """End the W&B run (a sweep starts the next arm's); nothing without one."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
