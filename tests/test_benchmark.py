"""benchmark_training.py: the per-stage benchmark of one toy exp02 step at a tiny size (every
stage present, shares of peak in (0, 1], each step the sum of its stages, the estimate by its
formula), the token_stats timer's roles, and the TRL side-by-side's message where trl is missing
(TRL itself is not installed here: README "Benchmarks").

Run: python -m pytest tests/test_benchmark.py -q   (about 40 s on 2 cores)
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmark_training as bench
import common
import exp02_onpolicy_grpo_sdpo as exp02
from infra import loss_head

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--threads", "1", "--prompts-per-step", "2", "--rollouts", "2",
        "--eval-n", "2", "--max-new-tokens", "8", "--repeats", "1"]
STAGES = {"rollouts", "pi_old", "grpo_update", "sdpo_context", "sdpo_teacher", "sdpo_update",
          "evaluation"}
STEPS = {"grpo_step": ["rollouts", "pi_old", "grpo_update"],
         "sdpo_step": ["rollouts", "sdpo_context", "pi_old", "sdpo_teacher", "sdpo_update"]}


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "benchmark_training.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "stages.json"
    done = run("stages", *TINY, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_every_stage_is_timed_with_its_work(stages):
    result, _ = stages
    rows = result["stages"]
    assert set(rows) == STAGES
    assert result["sequences"] == 4
    for name, row in rows.items():
        assert row["seconds"] > 0 and row["seconds"] == min(row["timings"]), name
        if name == "sdpo_context":  # no model FLOPs: building the teacher's prompts
            assert row["gflop"] == 0 and row["share_of_peak"] is None
        else:
            assert row["tokens"] > 0 and 0 < row["share_of_peak"] <= 1, (name, row)
    # the student scores every sequence once per update, each shared prompt forwarded once as in
    # the rollouts' prefill (only each sequence's last prompt token again: at most one position
    # per sequence more than the rollouts forward); pi_old only mini-batch 2's (1's is the
    # student's own)
    tokens = rows["rollouts"]["tokens"]
    assert 0 < rows["pi_old"]["tokens"] < rows["grpo_update"]["tokens"]
    assert rows["grpo_update"]["tokens"] <= tokens + result["sequences"]
    assert rows["sdpo_update"]["tokens"] == rows["grpo_update"]["tokens"]
    assert rows["sdpo_teacher"]["tokens"] > 0
    assert result["token_stats_calls"]["grpo"]["teacher"] == 0
    assert min(result["token_stats_calls"]["sdpo"].values()) >= 1


def test_steps_are_sums_and_the_estimate_follows_its_formula(stages):
    result, table = stages
    rows, totals = result["stages"], result["totals"]
    for step, parts in STEPS.items():
        assert totals[step]["parts"] == [rows[p]["stage"] for p in parts]
        for key in ("seconds", "gflop"):
            assert totals[step][key] == pytest.approx(sum(rows[p][key] for p in parts))
        assert 0 < totals[step]["share_of_peak"] <= 1
    e = result["toy_reproduction_estimate"]
    assert (e["grpo_runs"], e["sdpo_runs"], e["steps"], e["evals_per_run"]) == (12, 30, 60, 13)
    assert 2 <= e["full_evaluations_per_run"] <= 13
    expected = (60 * (12 * totals["grpo_step"]["seconds"] + 30 * totals["sdpo_step"]["seconds"])
                + 42 * e["full_evaluations_per_run"] * rows["evaluation"]["seconds"])
    assert e["total_s"] == pytest.approx(expected)
    for row in [*rows.values(), *totals.values()]:
        assert row["stage"] in table


def test_token_stats_timer_keys_calls_by_role_and_restores():
    model = common.load_model("toy", device="cpu", dtype=torch.float32)[0]
    teacher = common.load_model("toy", device="cpu", dtype=torch.float32)[0]
    pairs = [([2, 3], [4, 5, 1]), ([2], [4])]  # a one-token prompt: the plain forward
    calls, original = [], loss_head.token_stats
    with bench.timed_token_stats(teacher, calls, "cpu"):
        assert exp02.token_stats is not original
        exp02.token_stats(model, pairs, 0, None, 2048, grad=False)
        exp02.token_stats(model, pairs, 0, 0, 2048)
        exp02.token_stats(teacher, pairs, 0, 0, 2048, None, False)  # grad by position
    assert exp02.token_stats is original and loss_head.token_stats is original
    assert [(role, lengths) for role, _, lengths in calls] == [
        ("pi_old", [5, 2]), ("student", [5, 2]), ("teacher", [5, 2])]
    shared = [([2, 3, 6], [4, 5, 1]), ([2, 3, 6], [4])]  # one prefix [2, 3], forwarded once
    with bench.timed_token_stats(teacher, calls, "cpu"):
        exp02.token_stats(model, shared, 0, None, 2048, grad=False)
    assert calls[-1][2] == [2, 4, 2]


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="trl is installed here")
def test_trl_side_by_side_says_trl_is_missing(tmp_path):
    done = run("trl", "--device", "cpu", "--out", str(tmp_path / "trl.json"), timeout=120)
    assert done.returncode == 1
    assert bench.TRL_MISSING in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "trl.json").exists()
