"""Grading: the epistemic counter and thinking split (common.py), the math world's verifier and
batched grader with timeouts (math_world.py, infra/grader_pool.py), avg@k / pass@k, and the
paper's parquet reader (infra/data_files.py).

Run: python -m pytest tests/test_grading.py -q   (about 25 s on 2 cores)
"""
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import math_world
from common import (EPISTEMIC_WORDS, avg_at_k, count_epistemic, epistemic_total, mean_pass_at_k, pass_at_k,
                    per_1k_tokens, split_thinking, strip_thinking)
from infra.data_files import read_paper_parquet
from math_world import grade, verify

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EVAL_DIR = SHARED_DATA / "paper" / "evaluation"
needs_shared = pytest.mark.skipif(not EVAL_DIR.is_dir(), reason=f"shared data not found at {EVAL_DIR}")

# Takes minutes-to-forever in sympy (9^(9^(9^387420489))). Inside workers math-verify's alarm is off,
# so only the parent's kill stops it: this exercises the kill-and-replace path.
HANG = r"<think>ok</think> The answer is $\boxed{9^{9^{9^{9^{9}}}}}$."
# A 5,000-digit plain number: sympify refuses it (int max str digits), math-verify raises SympifyError.
RAISES = "<think>ok</think> The answer is " + "1" * 5000


def zeros_except(**nonzero):
    return {w: nonzero.get(w, 0) for w in EPISTEMIC_WORDS}


# ---- epistemic counter ----

def test_epistemic_words_are_the_papers_ten():
    assert EPISTEMIC_WORDS == ("wait", "hmm", "perhaps", "maybe", "actually", "alternatively", "seems",
                               "might", "likely", "check")


@pytest.mark.parametrize("text, paper, word", [
    ("checking", {"check": 1}, {}),           # substring in paper mode only
    ("unlikely", {"likely": 1}, {}),
    ("await", {"wait": 1}, {}),
    ("hmmm", {"hmm": 1}, {"hmm": 1}),          # word mode: hm{2,}
    ("Hmmmm, hm.", {"hmm": 1}, {"hmm": 1}),    # "hm" is not hmm in either mode
    ("Wait, wait", {"wait": 2}, {"wait": 2}),
    ("WAIT. Perhaps it seems likely; maybe I might check. Actually, alternatively, hmm",
     {w: 1 for w in EPISTEMIC_WORDS}, {w: 1 for w in EPISTEMIC_WORDS}),
    ("I double-checked: it checks out, unlikely, waiting", {"check": 2, "likely": 1, "wait": 1}, {}),
])
def test_count_epistemic_paper_vs_word(text, paper, word):
    assert count_epistemic(text) == zeros_except(**paper)          # default mode is the paper's
    assert count_epistemic(text, mode="paper") == zeros_except(**paper)
    assert count_epistemic(text, mode="word") == zeros_except(**word)


def test_count_epistemic_rejects_unknown_mode():
    with pytest.raises(ValueError, match="paper.*word"):
        count_epistemic("wait", mode="regex")


def test_epistemic_total_and_rate():
    counts = count_epistemic("Wait, maybe. Wait.")
    assert epistemic_total(counts) == 3
    assert per_1k_tokens(3, 1500) == pytest.approx(2.0)
    assert per_1k_tokens(5, 0) == 0.0


# ---- thinking split ----

@pytest.mark.parametrize("response, think_in_prompt, expected", [
    ("<think>a</think>b", False, ("a", "b")),                 # Qwen3
    ("<think>\na\n</think>\n\nb", False, ("a", "b")),
    ("a</think>b", True, ("a", "b")),                          # DeepSeek-R1-Distill: <think> in prompt
    ("a</think>b</think>c", True, ("a", "b</think>c")),        # the FIRST </think> ends the thinking
    ("<think>a never ends", False, ("a never ends", None)),    # unterminated
    ("a never ends", True, ("a never ends", None)),
    ("just b", False, ("", "just b")),                         # non-thinking mode
])
def test_split_thinking(response, think_in_prompt, expected):
    assert split_thinking(response, think_in_prompt) == expected


@pytest.mark.parametrize("response, think_in_prompt, expected", [
    ("<think>a</think>b", False, "b"),
    ("x<think>a</think>y<think>c</think>z", False, "xyz"),    # every block goes
    ("a</think>b", True, "b"),
    ("a</think>b<think>c</think>d", True, "bd"),
    ("<think>a never ends", False, ""),
    ("a never ends", True, ""),
    ("  just b ", False, "just b"),
])
def test_strip_thinking(response, think_in_prompt, expected):
    assert strip_thinking(response, think_in_prompt) == expected


# ---- verifier (in-process; pytest runs tests in the main thread) ----

@pytest.mark.parametrize("response, gold, expected", [
    (r"<think>hmm</think>The answer is $\boxed{42}$.", "42", True),
    (r"<think>hmm</think>The answer is $\boxed{41}$.", "42", False),
    (r"<think>x</think>$\boxed{\frac{1}{\sqrt{2}}}$", r"\frac{\sqrt{2}}{2}", True),   # nested braces
    # math-verify equates a decimal and the fraction in both directions, within 6 decimals:
    (r"<think>x</think>$\boxed{0.5}$", r"\frac{1}{2}", True),
    (r"<think>x</think>$\boxed{\frac{1}{2}}$", "0.5", True),
    (r"<think>x</think>$\boxed{0.333333}$", r"\frac{1}{3}", True),
    (r"<think>x</think>$\boxed{0.333}$", r"\frac{1}{3}", False),
    (r"<think>x</think>$\boxed{(0,1]}$", "(0, 1]", True),                  # intervals
    (r"<think>x</think>$\boxed{[0,1]}$", "(0, 1]", False),
    (r"<think>x</think>$\boxed{(3, \frac{\pi}{2})}$", r"\left( 3, \frac{\pi}{2} \right)", True),  # bare gold
    (r"<think>x</think>$\boxed{(\frac{\pi}{2}, 3)}$", r"\left( 3, \frac{\pi}{2} \right)", False),
    (r"<think>x</think>$\boxed{18.90}$", r"\$18.90", True),               # escaped dollar is not math mode
    (r"<think>x</think>$\boxed{\text{Evelyn}}$", r"\text{Evelyn}", True),
    (r"<think>\boxed{42}</think>I am not sure.", "42", False),             # answer only in the thinking
    (r"<think>\boxed{42} and it never ends", "42", False),                 # no final answer
    ("<think>x</think>   ", "42", False),                                  # empty final answer
    (r"<think>x</think>First $\boxed{1}$. Later, the final result is $\boxed{2}$.", "2", True),  # last box
    # Boxes outside $...$ in one stretch of text are joined with "," and read as a thousands
    # separator: 541540. Inside $...$ each box is its own match and the last one wins.
    (r"<think>x</think>\boxed{541}, no wait \boxed{540}", "540", False),
    (r"<think>x</think>$\boxed{541}$, no wait $\boxed{540}$", "540", True),
])
def test_verify_cases(response, gold, expected):
    assert verify(response, gold) is expected


def test_verify_deepseek_form_grades_after_think():
    response = r"so \boxed{7} maybe</think>The answer is $\boxed{8}$."
    assert verify(response, "8", think_in_prompt=True)
    assert not verify(response, "7", think_in_prompt=True)


def test_bare_gold_needs_boxing():
    # Why verify() boxes bare golds: math-verify alone reads the bare pair as its first element.
    from math_verify import parse
    assert str(parse(r"\left( 3, \frac{\pi}{2} \right)")[0]) == "3"


def test_verify_reports_failures_instead_of_scoring_zero():
    with pytest.raises(RuntimeError, match="SympifyError"):
        verify(RAISES, "1")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        verify(HANG, "1", timeout_s=1)     # math-verify's own alarm, ceil(1) s per step
    assert time.monotonic() - t0 < 10


# ---- batched grader ----

MIXED = [  # (response, gold, expected)
    (r"<think>a</think>$\boxed{42}$", "42", True),
    (r"<think>a</think>$\boxed{43}$", "42", False),
    (r"<think>a</think>$\boxed{\frac{3}{56}}$", r"\frac{3}{56}", True),
    (r"<think>a</think>$\boxed{0.5}$", r"\frac{1}{2}", True),
    (r"<think>a</think>$\boxed{[0,1]}$", "(0, 1]", False),
    (r"<think>a</think>$\boxed{(-\infty,2)\cup(3,\infty)}$", r"(-\infty, 2) \cup (3, \infty)", True),
    (r"<think>$\boxed{42}$ never finished", "42", False),
    (r"<think>a</think>The answer is 27.", "27", True),
    (r"<think>a</think>$\boxed{\begin{pmatrix} -1 \\ 2 \end{pmatrix}}$", r"\begin{pmatrix} -1 \\ 2 \end{pmatrix}", True),
    (r"<think>a</think>$\boxed{x^2 + 1}$", "x^2+2", False),
] * 3


def test_grader_function_is_importable_by_the_workers():
    assert math_world.verify_answer.__module__ == "math_world"  # workers import it by name


def test_thinking_split_and_strip_span_lines():
    """Thinking blocks run over many lines; a single-line pattern would leave them in place."""
    multi = "<think>\nfirst line\nwait, second line\n\nthird\n</think>\n\nThe answer is $\\boxed{4}$."
    assert split_thinking(multi) == ("first line\nwait, second line\n\nthird", "The answer is $\\boxed{4}$.")
    assert strip_thinking(multi) == "The answer is $\\boxed{4}$."
    assert strip_thinking("<think>\nline one\nline two") == ""  # unclosed: to the end
    assert strip_thinking("a\n<think>x\ny</think>\nb\n<think>\nz\n</think>c") == "a\n\nb\nc"
    assert strip_thinking("x\ny\n</think>\nanswer 4", think_in_prompt=True) == "answer 4"
    assert verify(multi, "4") and not verify("<think>\n$\\boxed{4}$\nno end", "4")


def test_grade_matches_in_process_verify():
    responses, golds, expected = map(list, zip(*MIXED))
    report = grade(responses, golds, timeout_s=10, workers=2)
    assert report.correct == expected
    assert report.correct == [verify(r, g) for r, g in zip(responses, golds)]
    assert (report.timeouts, report.errors, report.timed_out, report.errored) == (0, 0, [], [])
    assert report.summary()["accuracy"] == pytest.approx(sum(expected) / len(expected))
    assert grade(responses, golds, workers=0).correct == expected     # in-process path agrees


def test_grade_kills_hung_item_and_counts_errors():
    responses, golds, expected = map(list, zip(*MIXED[:10]))
    responses[2:2] = [HANG]                      # index 2 hangs
    golds[2:2], expected[2:2] = ["1"], [False]
    responses += [RAISES, HANG]                  # index 11 raises, 12 hangs
    golds += ["1", "1"]
    expected += [False, False]
    grade(["<think>a</think>1"], ["1"], workers=2)     # pool warm, so the bound below is about the kill
    t0 = time.monotonic()
    report = grade(responses, golds, timeout_s=2, workers=2)
    elapsed = time.monotonic() - t0
    assert report.correct == expected            # the items around the hung ones are still graded
    assert report.timed_out == [2, 12] and report.timeouts == 2
    assert report.errored == [11] and report.errors == 1
    assert report.details == {2: "timeout", 12: "timeout", 11: report.details[11]}
    assert report.details[11].startswith("error: SympifyError")
    assert elapsed < 2 * 2 + 8, f"two 2 s timeouts took {elapsed:.1f} s"
    again = grade(responses[:2], golds[:2], workers=2)    # replaced workers keep serving
    assert again.correct == expected[:2] and again.timeouts == 0


def test_grade_in_process_counts_timeouts_and_errors():
    report = grade([HANG, RAISES, r"<think>a</think>$\boxed{1}$"], ["1", "1", "1"], timeout_s=1, workers=0)
    assert report.correct == [False, False, True]
    assert (report.timed_out, report.errored) == ([0], [1])


def test_grade_works_off_the_main_thread_where_verify_refuses():
    import threading
    out = {}

    def work():
        out["report"] = grade([r"<think>a</think>$\boxed{5}$", r"<think>a</think>$\boxed{6}$"], ["5", "5"], workers=2)
        try:
            verify(r"<think>a</think>$\boxed{5}$", "5")
        except RuntimeError as e:
            out["verify_error"] = str(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert out["report"].correct == [True, False]
    assert "main thread" in out["verify_error"]


def test_grade_prescreens_and_validates():
    report = grade([r"<think>\boxed{1} unfinished", "<think>a</think>"], ["1", "1"], workers=2)
    assert report.correct == [False, False] and report.timeouts == report.errors == 0
    assert grade([], [], workers=2).correct == []
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        grade(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="timeout_s > 0"):
        grade(["a"], ["1"], timeout_s=0)


# ---- avg@k, pass@k ----

def test_avg_at_k():
    correct = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    assert avg_at_k(correct) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError):
        avg_at_k(np.zeros((0, 4), dtype=bool))


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 2, 0.5),             # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (16, 0, 16, 0.0),
    (16, 0, 1, 0.0),
    (16, 16, 1, 1.0),
    (16, 4, 1, 0.25),           # pass@1 = c/n
    (5, 2, 3, 0.9),             # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (16, 15, 2, 1.0),           # n - c < k
])
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_validates_and_averages():
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    assert mean_pass_at_k(correct, 2) == pytest.approx((0.5 + 0.0) / 2)
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct))


# ---- the paper's parquet files ----

@needs_shared
@pytest.mark.parametrize("name, n", [("aime24", 30), ("aime25", 30), ("amc23", 40), ("math500", 500)])
def test_read_paper_parquet_real_files(name, n):
    rows = read_paper_parquet(EVAL_DIR / f"{name}.parquet")
    assert len(rows) == n
    for row in rows:
        assert set(row) == {"prompt", "gold", "data_source", "extra_info"}
        assert isinstance(row["gold"], str) and row["gold"]
        assert "\\boxed{}" in row["prompt"] and not row["prompt"].startswith("[")  # text, not JSON
        assert isinstance(row["extra_info"], dict)
    if name == "aime24":                       # nested layout
        assert rows[0]["gold"] == "540" and rows[0]["data_source"] == "math_dapo"
    if name == "math500":                      # JSON-string layout
        assert rows[0]["gold"] == r"\left( 3, \frac{\pi}{2} \right)"
        assert rows[0]["extra_info"]["level"] is not None


def _write(tmp_path, **columns):
    path = tmp_path / "bad.parquet"
    pd.DataFrame(columns).to_parquet(path)
    return path


def test_read_paper_parquet_rejects_malformed(tmp_path):
    ok_prompt = '[{"role": "user", "content": "q"}]'
    ok_rm = '{"ground_truth": 7}'
    rows = read_paper_parquet(_write(tmp_path, data_source=["s"], prompt=[ok_prompt], reward_model=[ok_rm]))
    assert rows == [{"prompt": "q", "gold": "7", "data_source": "s", "extra_info": {}}]  # int gold -> str
    with pytest.raises(ValueError, match=r"bad\.parquet.*'reward_model'"):
        read_paper_parquet(_write(tmp_path, data_source=["s"], prompt=[ok_prompt]))
    with pytest.raises(ValueError, match=r"'prompt' row 0: expected JSON"):
        read_paper_parquet(_write(tmp_path, data_source=["s"], prompt=["{oops"], reward_model=[ok_rm]))
    with pytest.raises(ValueError, match=r"'prompt' row 0: expected a list of one"):
        read_paper_parquet(_write(tmp_path, data_source=["s"], prompt=['"just text"'], reward_model=[ok_rm]))
    with pytest.raises(ValueError, match=r"'reward_model' row 0: expected a dict"):
        read_paper_parquet(_write(tmp_path, data_source=["s"], prompt=[ok_prompt], reward_model=['{"answer": 1}']))
    with pytest.raises(ValueError, match="no rows"):
        read_paper_parquet(_write(tmp_path, data_source=pd.Series([], dtype=str),
                                  prompt=pd.Series([], dtype=str), reward_model=pd.Series([], dtype=str)))


@needs_shared
def test_paper_golds_verify_against_themselves():
    """All 600 eval golds, embedded in a typical response, must grade correct (>= 99 %); the same
    responses against the next problem's gold must mostly fail (the verifier is not a yes-machine)."""
    golds = [row["gold"] for name in ("aime24", "aime25", "amc23", "math500")
             for row in read_paper_parquet(EVAL_DIR / f"{name}.parquet")]
    assert len(golds) == 600
    responses = [f"<think>\nLet me compute... wait, check.\n</think>\n\nThe answer is $\\boxed{{{g}}}$." for g in golds]
    report = grade(responses, golds, workers=2)
    failures = [(g, i in report.timed_out, i in report.errored) for i, (g, ok) in enumerate(zip(golds, report.correct))
                if not ok]
    for gold, timed_out, errored in failures:
        print(f"FAILED gold={gold!r} timed_out={timed_out} errored={errored}")
    assert len(failures) <= 6, failures
    shifted = grade(responses, golds[1:] + golds[:1], workers=2)
    assert sum(shifted.correct) <= 30, "a response matched another problem's gold too often"


# ---- the benchmark script runs end to end ----

@pytest.mark.slow
def test_benchmark_script_smoke(tmp_path):
    import json
    import subprocess
    import sys
    out = tmp_path / "grading.json"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "benchmark_grading.py", "--n", "64", "--workers", "2", "--timeout", "1",
                    "--out", str(out)], cwd=root, check=True, capture_output=True, timeout=120)
    result = json.loads(out.read_text())
    assert result["n"] == 64 and result["workers"] == 2 and result["responses_per_s"] > 0
    assert result["expected_mismatches"] == 0 and result["timeouts"] == result["errors"] == 0
    assert result["pathological"]["timeouts"] >= 2 and result["pathological"]["errors"] == 1
    assert {"platform", "cpu_count", "usable_cpus"} <= set(result["machine"])
