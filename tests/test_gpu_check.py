"""gpu_check.py runs its CPU-capable parts in tiny mode (the GPU sizes need CUDA) and writes
its JSON; without CUDA and without --tiny it refuses with the fix."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_gpu_check_tiny_cpu_mode_writes_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "gpu_check.py",
            "--tiny",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] is True
    parts = result["parts"]
    for method in ("grpo", "sdpo"):  # fp32 on the CPU: the 1-rank FSDP2 update equals the plain one
        a = parts["fsdp_equals_unsharded"][method]
        assert (
            a["fsdp2_sharded"]
            and a["pass"]
            and a["grad_rel_l2"] <= 1e-4
            and a["grad_norm_unsharded"] > 0
        )
    assert parts["loss_head_cuda_peak"] == {"skipped": "needs CUDA"}
    assert (
        parts["update"]["grpo_update"]["tokens_per_s"] > 0
        and parts["update"]["sdpo_update"]["tokens_per_s"] > 0
    )
    assert parts["generation"]["generated_tokens"] > 0


def test_gpu_check_refuses_full_sizes_without_cuda_and_dry_run_plans(capsys):
    with pytest.raises(SystemExit, match="no CUDA device here"):
        gpu_check.main(["--device", "cpu"])
    plan = gpu_check.main(["--dry-run", "--device", "cpu"])
    assert plan["sizes"]["c"]["response_len"] + plan["sizes"]["c"]["prompt_len"] == 8192
    assert plan["sizes"]["b"]["vocab"] == 151936
