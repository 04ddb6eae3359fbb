"""exp03 — SDPO with the frozen vs a moving (EMA) teacher (claim C4; docs/PROTOCOL.md §5).

Claim C4: updating the teacher towards the student after every step,
    theta_T <- (1 - tau) theta_T + tau theta_S        (tau = 0.05 in the paper's ablation),
amplifies the collapse compared with the frozen initial teacher (tau = 0, the paper's main setting).

This script is a sweep over tau: every arm is exp02's trainer (`train_arm`, imported, never copied)
with the same seeds, data order, budgets and evaluation; only `--ema-rate` differs. Per step it logs
what exp02 logs (training reward, length, epistemic counts, held-out/OOD accuracy every eval) and in
particular the teacher–student divergence split into epistemic tokens and all other tokens
(`train/sdpo/divergence_epistemic`, `train/sdpo/divergence_other`).

  python exp03_ema_teacher.py                          # toy world: tau in {0, 0.01, 0.05, 0.2},
                                                       # one seed
  python exp03_ema_teacher.py --seeds 0,1,2            # the README's table (mean ± std)
  python exp03_ema_teacher.py --model deepseek-r1-distill-qwen-7b --ema-rates 0,0.05  # paper

Where we depart from the paper: exp02's list (its docstring) applies unchanged; in addition the
sweep adds tau = 0.01 and 0.2 around the paper's 0.05 to show the trend, not a single point.
"""

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import common
from infra import progress, run_dirs, tables
import exp02_onpolicy_grpo_sdpo as exp02
from infra.settings import arg, cli, parse_settings


@dataclass
class Settings(exp02.Settings):
    method: str = arg("sdpo", "SDPO only: the EMA teacher is an SDPO ablation")
    out_dir: str = arg("runs/{model}/exp03", "run directory ({model} = the --model name); each "
                                             "rate and seed writes <out_dir>/ema<tau>/seed<k>/")
    ema_rates: str = arg("0,0.01,0.05,0.2",
                         "teacher EMA rates tau to compare (0 = the frozen teacher)")
    frozen_from: str = arg("", "an exp02 --out-dir: tau = 0 is its sdpo_s/seed<k> run when that "
                           "finished with the same settings (copied, not trained twice)")

    SWEEP_ONLY: ClassVar[tuple] = exp02.Settings.SWEEP_ONLY + ("ema_rates", "frozen_from")


def run_name(tau: float) -> str:
    return f"ema{tau:g}"


def reuse_frozen(s: Settings, run_dir: str) -> bool:
    """tau = 0 is exp02's SDPO c = s run (frozen teacher) with the same seed: copy it from
    --frozen-from when it finished there with the same settings (run_dirs.check_run decides),
    so no run is computed twice. The copy's final.json names its source (`reused_from`)."""
    source = Path(s.frozen_from, "sdpo_s", f"seed{s.seed}")
    if s.ema_rate != 0 or not s.frozen_from or Path(run_dir, "final.json").exists():
        return False
    resolved = exp02.resolve(s, common.pick_world(s.model))  # the world's defaults filled in
    try:
        if run_dirs.check_run(source, resolved, resume=True,
                              sweep_only=Settings.SWEEP_ONLY) != "finished":
            return False
    except (FileExistsError, ValueError) as err:  # other settings: train tau = 0 here
        print(f"--frozen-from {source}: not reused ({err})", flush=True)
        return False
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("checkpoints"),
                    dirs_exist_ok=True)
    final = json.loads(Path(run_dir, "final.json").read_text())
    common.write_json_atomic(Path(run_dir, "final.json"), dict(final, reused_from=str(source)))
    print(f"{run_dir}: tau = 0 is {source} (same settings): copied", flush=True)
    return True


def main(argv=None) -> list[dict]:
    s = parse_settings(Settings, argv)
    s = replace(s, out_dir=run_dirs.default_out_dir(s.out_dir, s.model))
    if s.method != "sdpo":
        raise ValueError(f"--method {s.method!r}: exp03 compares teachers of SDPO only; "
                         "use --method sdpo")
    try:
        rates = [float(x) for x in s.ema_rates.split(",")]
    except ValueError:
        raise ValueError(f"--ema-rates {s.ema_rates!r}: give comma-separated numbers in [0, 1], "
                         "e.g. 0,0.05") from None
    seeds = [int(x) for x in s.seeds.split(",")] if s.seeds else [s.seed]
    runs = [(replace(s, seed=seed, ema_rate=tau), f"{s.out_dir}/{run_name(tau)}/seed{seed}")
            for seed in seeds for tau in rates]
    copied = {d for a, d in runs if reuse_frozen(a, d)}
    for a, d in runs:  # every run directory checked before the first model loads
        if d not in copied:
            exp02.plan_arm(a, d)
    finals = [dict(run_dirs.read_final(d) if d in copied else exp02.train_arm(a, d),
                   arm=run_name(a.ema_rate)) for a, d in progress.bar(runs, "exp03 runs")]
    tables.report(finals, s.out_dir, common.pick_world(s.model), exp02.arm_name)
    return finals


if __name__ == "__main__":
    cli(main)
