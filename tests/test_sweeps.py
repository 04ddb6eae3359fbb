"""exp03 (EMA teacher sweep) and exp04 (coverage sweep): end-to-end subprocess runs through the
math-world code path on a tiny model, the coverage sets, and their bad-input errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import common
from tiny import TINY as TINY_MODEL  # noqa: E402
import exp04_coverage as e4
from test_exp02 import write_paper_parquet

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "2", "--prompts-per-step", "2", "--rollouts", "2", "--max-new-tokens", "24", "--eval-k", "1",
        "--threads", "1", "--topk", "16", "--eval-every", "2"]


@pytest.fixture
def data(tmp_path):
    write_paper_parquet(tmp_path / "train.parquet", [(f"What is {i}+{2 - i}?", "2") for i in range(3)])
    write_paper_parquet(tmp_path / "one_x4.parquet", [("What is 1+1?", "2")] * 4)  # a repeated row: its own group
    for name in ("aime24", "amc23"):
        write_paper_parquet(tmp_path / f"{name}.parquet", [("What is 1+1?", "2")])
    return tmp_path


def run(script, args, timeout=600):
    proc = subprocess.run([sys.executable, str(ROOT / script)] + args, capture_output=True, text=True, timeout=timeout)
    return proc


def test_exp03_sweeps_the_ema_rate(data, answering_model):
    out = data / "exp03"
    proc = run("exp03_ema_teacher.py", ["--model", str(answering_model), "--train-file", str(data / "train.parquet"),
                                        "--data-dir", str(data), "--out-dir", str(out), "--ema-rates", "0,0.5"] + TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for tau in ("ema0", "ema0.5"):
        final = json.loads((out / tau / "seed0" / "final.json").read_text())
        assert final["method"] == "sdpo" and final["settings"]["ema_rate"] == float(tau[3:])
        assert "train/sdpo/divergence_epistemic" in final["final"] and "train/sdpo/divergence_other" in final["final"]
    assert [r["arm"] for r in json.loads((out / "summary.json").read_text())] == ["base (step 0)", "ema0", "ema0.5"]


def test_exp03_takes_tau_zero_from_exp02_instead_of_training_it_again(data, answering_model):
    common_args = ["--model", str(answering_model), "--train-file", str(data / "train.parquet"),
                   "--data-dir", str(data)] + TINY
    proc = run("exp02_onpolicy_grpo_sdpo.py", common_args + ["--method", "sdpo",
                                                             "--out-dir", str(data / "exp02")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("exp03_ema_teacher.py", common_args + ["--ema-rates", "0", "--out-dir",
                                                      str(data / "exp03"), "--frozen-from",
                                                      str(data / "exp02")])
    assert proc.returncode == 0 and "copied" in proc.stdout, proc.stderr[-3000:]
    source = json.loads((data / "exp02" / "sdpo_s" / "seed0" / "final.json").read_text())
    copy = json.loads((data / "exp03" / "ema0" / "seed0" / "final.json").read_text())
    assert copy.pop("reused_from").endswith("sdpo_s/seed0") and copy == source
    assert not (data / "exp03" / "ema0" / "seed0" / "checkpoints").exists()
    proc = run("exp03_ema_teacher.py", common_args + ["--ema-rates", "0", "--lr", "1e-3",
                                                      "--out-dir", str(data / "exp03b"),
                                                      "--frozen-from", str(data / "exp02")])
    assert proc.returncode == 0 and "not reused" in proc.stdout, proc.stderr[-3000:]  # trained
    assert "reused_from" not in (data / "exp03b" / "ema0" / "seed0" / "final.json").read_text()


def test_exp03_rejects_bad_rates(tmp_path):
    proc = run("exp03_ema_teacher.py", ["--model", TINY_MODEL, "--ema-rates", "0,fast", "--out-dir", str(tmp_path)])
    assert proc.returncode == 2 and "--ema-rates" in proc.stderr and "Traceback" not in proc.stderr


def test_exp04_coverage_arms_from_subsets_and_files(data, answering_model):
    out = data / "exp04"
    args = ["--model", str(answering_model), "--train-file", str(data / "train.parquet"), "--data-dir", str(data),
            "--out-dir", str(out), "--coverages", "1,3"] + TINY
    proc = run("exp04_coverage.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = {r["arm"] for r in json.loads((out / "summary.json").read_text())}
    assert arms == {"base (step 0)", "cov1/grpo", "cov1/sdpo_s", "cov3/grpo", "cov3/sdpo_s"}
    rows = common.read_metrics(out / "cov1" / "sdpo_s" / "seed0")
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/aime24/avg@1" in rows[-1]
    files = run("exp04_coverage.py", args[:-len(TINY)] + TINY + ["--train-files", str(data / "one_x4.parquet"),
                                                                  "--method", "grpo", "--out-dir", str(data / "f")])
    assert files.returncode == 0, files.stderr[-3000:]
    assert (data / "f" / "one_x4" / "grpo" / "seed0" / "final.json").exists()


def test_coverage_sets_are_seeded_subsets_and_fresh_graphs_change_every_step():
    s = e4.Settings(coverages="1,8,fresh")
    import toy_world

    sets = e4.training_sets(s, toy_world)
    assert list(sets) == ["cov1", "cov8", "fresh"] and len(sets["cov8"]) == 8 and sets["fresh"] is None
    assert sets["cov8"] == e4.training_sets(s, toy_world)["cov8"]  # seeded
    fresh = e4.batches(toy_world, None, 4, seed=0)
    assert len(fresh(1)) == 4 and fresh(1) == fresh(1) and fresh(1) != fresh(2)
    one = e4.batches(toy_world, sets["cov1"], 4, seed=0)
    assert one(3) == sets["cov1"] * 4  # one question: every prompt of the step is it, each its own group


@pytest.mark.parametrize("coverages, message", [
    ("", "no coverage to run"), ("0", "not a positive number"), ("100", "the training pool has only 3"),
    ("fresh", "only in the toy world"),
])
def test_bad_coverages_fail_clearly(data, tmp_path, coverages, message):
    proc = run("exp04_coverage.py", ["--model", TINY_MODEL, "--train-file", str(data / "train.parquet"),
                                     "--coverages", coverages, "--out-dir", str(tmp_path / "o")], timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_empty_coverage_file_fails_clearly(tmp_path):
    write_paper_parquet(tmp_path / "empty.parquet", [])
    proc = run("exp04_coverage.py", ["--model", TINY_MODEL, "--train-files", str(tmp_path / "empty.parquet"),
                                     "--out-dir", str(tmp_path / "o")], timeout=300)
    assert proc.returncode == 2 and "empty.parquet" in proc.stderr and "Traceback" not in proc.stderr
