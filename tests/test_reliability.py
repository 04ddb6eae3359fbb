"""Issue: reliability. A run killed with SIGKILL resumes to the same result; bad input gets a
clear message and a non-zero exit, and leaves no partial result behind."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import common
from infra import run_dirs
from infra import checkpoints  # noqa: E402
import math_world  # noqa: E402
from tiny import TINY as TINY_MODEL  # noqa: E402
from test_exp02 import write_paper_parquet

ROOT = Path(__file__).resolve().parents[1]
EXP02 = [sys.executable, str(ROOT / "exp02_onpolicy_grpo_sdpo.py")]
TOY_RUN = ["--model", "toy", "--method", "sdpo", "--steps", "6", "--prompts-per-step", "4", "--rollouts", "4",
           "--eval-every", "3", "--eval-n", "16", "--checkpoint-every", "2", "--threads", "1"]


def comparable(final: dict) -> dict:
    return {k: v for k, v in final["final"].items() if not k.startswith("time/")}


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_uninterrupted(tmp_path):
    if not (ROOT / "toy_model").exists():
        pytest.skip("toy_model/ is missing")
    straight = subprocess.run(EXP02 + TOY_RUN + ["--out-dir", str(tmp_path / "a")], capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    run = tmp_path / "b" / "sdpo_s" / "seed0"
    proc = subprocess.Popen(EXP02 + TOY_RUN + ["--out-dir", str(tmp_path / "b")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once a checkpoint exists and training has moved past it
        rows = common.read_metrics(run)
        if (run / "checkpoints" / "step_000002").exists() and rows and rows[-1]["step"] >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final.json").exists()
    resumed = subprocess.run(EXP02 + TOY_RUN + ["--out-dir", str(tmp_path / "b"), "--resume"], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "a" / "sdpo_s" / "seed0" / "final.json").read_text())
    b = json.loads((run / "final.json").read_text())
    assert comparable(a) == comparable(b)
    assert [r["step"] for r in common.read_metrics(run)] == list(range(7))  # no step lost or doubled
    assert len(list((run / "checkpoints").glob("step_*"))) == 1  # bounded number of checkpoints


def run_exp02(args, tmp_path, env=None):
    out = tmp_path / "out"
    proc = subprocess.run(EXP02 + ["--out-dir", str(out), "--threads", "1"] + args, capture_output=True, text=True,
                          timeout=300, env=env)
    return proc, out


@pytest.fixture
def data(tmp_path):
    write_paper_parquet(tmp_path / "train.parquet", [("What is 1+1?", "2")])
    for name in ("aime24", "amc23"):
        write_paper_parquet(tmp_path / f"{name}.parquet", [("What is 3+3?", "6")])
    return tmp_path


TINY = ["--model", TINY_MODEL, "--steps", "1", "--prompts-per-step", "1", "--rollouts", "2",
        "--max-new-tokens", "4", "--eval-k", "1"]


@pytest.mark.parametrize("args, message", [
    (["--model", "qwen9-huge"], "unknown model 'qwen9-huge': use one of"),
    (TINY + ["--ema-rate", "1.5"], "--ema-rate 1.5 must be in [0, 1]"),
    (TINY + ["--topk", "100000"], "exceeds the vocabulary"),
    (TINY + ["--mini-batches", "3"], "do not split into --mini-batches 3"),
    (TINY + ["--method", "ppo"], "use grpo, sdpo or all"),
    (TINY + ["--teacher-context", "think", "--method", "sdpo"], "use s or s_nothink"),
])
def test_bad_flags_fail_clearly_and_write_nothing(data, tmp_path, args, message):
    proc, out = run_exp02(args + ["--train-file", str(data / "train.parquet"), "--data-dir", str(data)], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() or not list(out.rglob("*.json*"))


def test_bad_data_files_fail_clearly(data, tmp_path):
    pd.DataFrame({"prompt": ["x"], "answer": ["1"]}).to_parquet(tmp_path / "bad.parquet")
    write_paper_parquet(tmp_path / "empty.parquet", [])
    cases = [(tmp_path / "bad.parquet", "reward_model"), (tmp_path / "empty.parquet", "empty"),
             (tmp_path / "missing.parquet", "does not exist")]
    for path, message in cases:
        proc, out = run_exp02(TINY + ["--train-file", str(path), "--data-dir", str(data)], tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, (path, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        assert not out.exists() or not list(out.rglob("*.json*"))


def test_offline_hub_dataset_suggests_the_local_file_option(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc, out = run_exp02(TINY, tmp_path, env=env)
    assert proc.returncode == 2 and "--train-file" in proc.stderr and "Traceback" not in proc.stderr


def test_unparseable_gold_no_answer_and_enormous_responses_are_graded_and_counted():
    responses = ["<think>x</think> \\boxed{2}", "<think>never finished", "<think>a</think>" + "1+" * 200_000 + "1",
                 "<think>a</think> \\boxed{3}"]
    golds = ["", "2", "3", "3"]  # an empty gold parses to nothing: an error, counted and listed
    report = math_world.grade(responses, golds, timeout_s=3.0)
    assert report.correct == [False, False, False, True]
    assert report.errors + report.timeouts >= 1 and 0 in report.errored + report.timed_out
    assert 1 not in report.errored + report.timed_out  # no final answer is simply wrong, not an error


def test_unfinished_run_is_neither_overwritten_nor_silently_continued(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class S:
        seed: int = 0
        """seed"""

    run = run_dirs.start_run(tmp_path / "r", S())
    run_dirs.log_metrics(run, 1, {"x": 1.0})
    with pytest.raises(FileExistsError, match="--resume"):
        run_dirs.start_run(run, S())
    with pytest.raises(ValueError, match=r"other settings .* --seed \(run: 0, now: 1\)"):
        run_dirs.start_run(run, S(seed=1), resume=True)
    assert run_dirs.start_run(run, S(), resume=True) == run
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "x": ')  # a line cut by a crash
    assert [r["step"] for r in common.read_metrics(run)] == [1]


def test_resume_skips_finished_runs_and_starts_runs_not_begun(tmp_path):
    """One `--resume` continues an interrupted sweep: finished runs are returned, new ones start."""
    from dataclasses import dataclass

    @dataclass
    class S:
        seed: int = 0
        """seed"""

    done = run_dirs.start_run(tmp_path / "done", S())
    run_dirs.finish_run(done, {"final": {"x": 1.0}})
    assert run_dirs.check_run(done, S(), resume=True) == "finished"
    assert run_dirs.read_final(done) == {"final": {"x": 1.0}}
    with pytest.raises(FileExistsError, match="--resume to reuse it"):
        run_dirs.check_run(done, S())
    with pytest.raises(ValueError, match="finished run"):  # finished runs are compared too
        run_dirs.check_run(done, S(seed=1), resume=True)
    assert run_dirs.check_run(tmp_path / "new", S(), resume=True) == "new"
    assert run_dirs.start_run(tmp_path / "new", S(), resume=True) == tmp_path / "new"
    assert (tmp_path / "new" / "config.json").exists()


def test_resume_before_the_first_checkpoint_starts_again(tmp_path):
    """A run cut off before its first checkpoint has nothing to continue: its metrics are cleared
    and it starts from step 0 (the run, not an error)."""
    run = tmp_path / "run"
    run.mkdir()
    run_dirs.log_metrics(run, 0, {"x": 1.0})
    assert checkpoints.load_checkpoint(run) == (0, {})
    assert common.read_metrics(run) == []
    checkpoints.save_checkpoint(run, 3, {"w": 1})
    run_dirs.log_metrics(run, 3, {"x": 2.0})
    run_dirs.log_metrics(run, 4, {"x": 3.0})
    step, state = checkpoints.load_checkpoint(run)
    assert (step, state["w"]) == (3, 1) and [r["step"] for r in common.read_metrics(run)] == [3]
