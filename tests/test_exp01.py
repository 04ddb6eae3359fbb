"""exp01: teacher-context messages, budget forcing, and an end-to-end subprocess run through the
math-world code path (chat template, math-verify grading, SFT step) on a tiny model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import common
from infra import rollout  # noqa: E402
import exp01_offpolicy as e
from test_exp02 import write_paper_parquet

ROOT = Path(__file__).resolve().parents[1]


def test_context_messages_follow_the_release_format():
    sol = "<think>\nlet me see\n</think>\n\n\\boxed{4}"
    assert e.context_message("Q", "none", None, False) == "Q"
    assert e.context_message("Q", "s", sol, False) == common.teacher_message("Q", sol)
    assert e.context_message("Q", "s_nothink", sol, False) == common.teacher_message("Q", "\\boxed{4}")
    assert e.context_message("Q", "s_nothink", "let me see\n</think>\n\nX", True) == common.teacher_message("Q", "X")
    assert e.context_message("Q", "regenerated", None, False) is None  # no round-1 success: no hint


class Scripted:
    """A generator that answers from a script: the first call closes its thinking, the second
    (the forced continuation) gives what follows `wait`."""

    def __init__(self, first, second):
        self.calls, self.first, self.second = [], first, second

    def generate(self, prompts, n=1, **kw):
        self.calls.append(prompts)
        ids = self.first if len(self.calls) == 1 else self.second
        return [[rollout.Sample(list(ids), "", "stop") for _ in range(n)] for _ in prompts]


def test_budget_forcing_replaces_the_first_close_with_wait():
    import toy_world

    tok = toy_world.build_tokenizer()
    enc = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    inner = Scripted(enc("<think> n1 n2 </think> answer n1") + [tok.eos_token_id], enc("n3 </think> answer n3"))
    out = e.BudgetForcing(inner, tok, "wait").generate([[5, 6]], n=2, max_tokens=64)
    assert len(inner.calls) == 2 and inner.calls[1][0] == [5, 6] + enc("<think> n1 n2 wait")
    assert out[0][0].text == "<think> n1 n2 wait n3 </think> answer n3" and out[0][0].finish_reason == "stop"
    no_close = Scripted(enc("<think> n1 n2"), [])
    assert e.BudgetForcing(no_close, tok, "wait").generate([[5]], max_tokens=64)[0][0].token_ids == enc("<think> n1 n2")
    assert len(no_close.calls) == 1  # nothing to force


@pytest.fixture
def data(tmp_path):
    write_paper_parquet(tmp_path / "train.parquet", [(f"What is {i}+{2 - i}?", "2") for i in range(3)]
                        + [("What is 2+5?", "7")])
    for name in ("aime24", "aime25", "amc23", "math500"):
        write_paper_parquet(tmp_path / f"{name}.parquet", [("What is 1+1?", "2"), ("What is 3+3?", "6")])
    return tmp_path


def test_end_to_end_subprocess_on_a_tiny_model(data, answering_model):
    out = data / "out"
    cmd = [sys.executable, str(ROOT / "exp01_offpolicy.py"), "--model", str(answering_model),
           "--train-file", str(data / "train.parquet"), "--data-dir", str(data), "--out-dir", str(out),
           "--samples", "4", "--band-high", "4", "--max-new-tokens", "40", "--eval-k", "2", "--sft-epochs", "2",
           "--sft-batch-size", "2", "--budget-forcing", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Table 1" in proc.stdout and "Table 2" in proc.stdout
    run = out / "seed0"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "final.json", "samples", "stages"}
    final = json.loads((run / "final.json").read_text())
    assert final["selection"]["questions"] >= 1 and final["selection"]["tried"] == 4
    assert set(final["table1"]) == {"none", "s", "s_nothink", "regenerated"}
    for row in final["table1"].values():
        if row["questions"]:
            assert {"accuracy", "response_length", "epistemic/wait", "epistemic_word/total"} <= set(row)
    assert set(final["table2"]) == {"base", "D_ug", "D_sg"}
    for key in ("eval/aime24/avg@2", "eval/aime24/pass@2", "eval/math500/response_length", "eval_forced/amc23/avg@2"):
        assert key in final["table2"]["D_sg"], key
    assert final["table2"]["D_ug"]["sft/steps"] == final["table2"]["D_sg"]["sft/steps"] >= 1
    rows = common.read_metrics(run)  # one line per SFT step with both students' losses
    assert [r["step"] for r in rows] == list(range(1, final["table2"]["D_ug"]["sft/steps"] + 1))
    assert all("sft/D_ug/loss" in r and "sft/D_sg/loss" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["context"] for r in summary["table1"]] == ["none", "s", "s_nothink", "regenerated"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # finished: never overwritten
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_no_question_in_the_band_is_a_clear_error(data, answering_model):
    write_paper_parquet(data / "easy.parquet", [("What is 1+1?", "2")])  # always solved: never in 0..0
    cmd = [sys.executable, str(ROOT / "exp01_offpolicy.py"), "--model", str(answering_model),
           "--train-file", str(data / "easy.parquet"), "--data-dir", str(data), "--out-dir", str(data / "o"),
           "--samples", "2", "--band-low", "0", "--band-high", "0", "--max-candidates", "1", "--temperature", "0.01",
           "--max-new-tokens", "40", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "no question has 0..0 correct of 2 samples among the 1 tried" in proc.stderr


def test_unknown_model_and_offline_dataset_fail_clearly(tmp_path, answering_model):
    import os

    base = [sys.executable, str(ROOT / "exp01_offpolicy.py"), "--out-dir", str(tmp_path / "o"), "--threads", "1"]
    proc = subprocess.run(base + ["--model", "qwen9-huge"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown model 'qwen9-huge': use one of" in proc.stderr
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(base + ["--model", str(answering_model)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "--data-dir" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
