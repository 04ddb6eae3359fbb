"""The math world: the paper's models on DAPO-Math-17k, graded by math-verify, evaluated on
AIME24/25, AMC23 and MATH500. A peer of toy_world.py behind the same interface:

    training_problems(n, train_file)          questions [{prompt, gold}] to train on
    evaluation_sets(n, names, data_dir, ...)  {set name: problems}
    check_files(train_file, data_dir, names)  refuse missing files before anything loads
    grade(responses, golds, think_in_prompt)  a GradeReport (reward and evaluation alike)
    eval_sampling(preset, k, max_new_tokens)  (k, temperature, top_p, max_tokens) of evaluation
    HEADLINE, HEADLINE_NOTE, FORCING_WORD     the compact table's columns; the budget-forcing word
"""
from __future__ import annotations

import itertools
import math
import re
import threading
import time
from functools import lru_cache
from pathlib import Path

import common
from infra import grader_pool, hub
from infra.data_files import read_paper_parquet

NAME = "math"
DEFAULT_EVAL = ("aime24", "amc23")  # exp02's evaluation; exp01 adds aime25 and math500
ACTIVATION_CHECKPOINTING = True  # exp02 recomputes each decoder layer in backward
EVAL_SELECTED_AS = None  # exp01: evaluate the selected training questions too, as
FORCING_WORD = "Wait"
HEADLINE = {"AIME24 avg@k": (["eval/aime24/avg@"], 3), "AMC23 avg@k": (["eval/amc23/avg@"], 3),
            "doubt words": (["eval/aime24/epistemic/total"], 2),
            "length": (["eval/aime24/response_length"], 1)}
HEADLINE_NOTE = ("avg@k on AIME24 and AMC23; doubt words (epistemic count) and length (tokens) per "
                 "response on AIME24")


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------
def training_problems(n: int, train_file: str | None = None) -> list[dict]:
    """The training file, or DAPO-Math-17k from the hub (n: the toy world's pool size, unused)."""
    return load_train_problems(train_file)


def evaluation_sets(
    n: int, names=None, data_dir: str | None = None, train_graphs: bool = False
) -> dict:
    """The benchmark sets `names` (default DEFAULT_EVAL) from data_dir or the hub."""
    return {name: load_problems(name, data_dir) for name in names or DEFAULT_EVAL}


def check_files(train_file: str | None, data_dir: str | None, names=None) -> None:
    if train_file and not Path(train_file).exists():
        raise FileNotFoundError(f"--train-file {train_file} does not exist")
    for name in names or DEFAULT_EVAL if data_dir else ():
        if not (Path(data_dir) / f"{name}.parquet").exists():
            raise FileNotFoundError(
                f"{Path(data_dir) / name}.parquet not found: --data-dir must hold "
                f"{', '.join(names or DEFAULT_EVAL)} parquet files in the paper's layout"
            )


def eval_sampling(preset: dict, k: int, max_new_tokens: int) -> tuple[int, float, float, int]:
    """avg@k with the preset's sampling (the paper's) up to the preset's response budget."""
    return k, preset["temperature"], preset["top_p"], preset["max_new_tokens"]


FAILURE_CLASSES = ("correct", "wrong_answer", "cut_at_limit", "no_answer")
TOKEN_TYPES = ("epistemic", "answer", "other")
WORDS_COUNTED = ()  # the toy world counts its filler control's word
PROBE_WORD = None  # no single decision to probe in free-form math (the toy world's `maybe`)


def failure_class(problem: dict, response: str, finish_reason: str, correct: bool) -> str:
    """correct; cut_at_limit (the token budget ended it); no_answer (nothing after the
    thinking); wrong_answer (an answer math-verify does not equal to the gold)."""
    if correct:
        return "correct"
    if finish_reason == "length":
        return "cut_at_limit"
    return "wrong_answer" if common.split_thinking(response)[1] else "no_answer"


def token_types(tokens: list[str]) -> list[str]:
    """Per response token (the tokenizer's strings): epistemic (the piece is one of the paper's
    words), answer (from `</think>` on), other."""
    out = []
    for w in tokens:
        answer = bool(out) and out[-1] == "answer" or w == "</think>"
        word = w.lstrip("Ġ▁ ").strip().lower()
        out.append("answer" if answer else "epistemic" if word in common.EPISTEMIC_WORDS
                   else "other")
    return out


def probe_set(n: int) -> list[tuple[str, str, str]]:
    """No probe in the math world (see PROBE_WORD)."""
    return []


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
EVAL_SETS = {  # name -> (hub id, split, question column, answer column)
    "aime24": ("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": ("math-ai/aime25", "test", "problem", "answer"),
    "amc23": ("math-ai/amc23", "test", "question", "answer"),
    "math500": ("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
}
# as in the paper's files
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def load_problems(name: str, data_dir: str | None = None) -> list[dict]:
    """[{prompt, gold}] of an evaluation set: from `{data_dir}/{name}.parquet` in the paper's
    layout when given, else from the hub (with the paper's instruction appended)."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}: use one of {', '.join(EVAL_SETS)}")
    if data_dir:
        path = Path(data_dir) / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: --data-dir must hold {name}.parquet in the paper's layout"
            )
        return read_paper_parquet(path)
    hub_id, split, q, a = EVAL_SETS[name]
    rows = hub.load_hub_dataset(hub_id, split)
    return [{"prompt": r[q] + INSTRUCTION, "gold": str(r[a])} for r in rows]


DAPO_HUB_ID = "BytedTsinghua-SIA/DAPO-Math-17k"
_DAPO_HEAD = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
_DAPO_TAIL = '\n\nRemember to put your answer on its own line after "Answer:".'


def load_train_problems(train_file: str | None = None) -> list[dict]:
    """Training questions [{prompt, gold}]. A local parquet in the paper's layout is read as is
    (a repeated row stays: it is its own group); the hub's DAPO-Math-17k repeats each problem
    ~100 times, so it is de-duplicated and re-worded with the paper's instruction."""
    if train_file:
        if not Path(train_file).exists():
            raise FileNotFoundError(f"--train-file {train_file} does not exist")
        return read_paper_parquet(train_file)
    rows = hub.load_hub_dataset(DAPO_HUB_ID, "train")
    out, seen = [], set()
    for r in rows:
        q = r["prompt"][0]["content"].removeprefix(_DAPO_HEAD).removesuffix(_DAPO_TAIL).strip()
        if q not in seen:
            seen.add(q)
            out.append({"prompt": q + INSTRUCTION, "gold": str(r["reward_model"]["ground_truth"])})
    return out


# ---------------------------------------------------------------------------------------------
# Verifier (math-verify): one grader for reward and evaluation
# ---------------------------------------------------------------------------------------------
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _wrap_gold(gold: str) -> str:
    # Bare LaTeX golds mis-parse: "\left( 3, \frac{\pi}{2} \right)" alone parses to 3. Boxing makes
    # math-verify's boxed extractor take the whole expression. "\$18.90" is an escaped dollar,
    # not math mode.
    if "\\boxed" in gold or _UNESCAPED_DOLLAR.search(gold):
        return gold
    return f"\\boxed{{{gold}}}"


@lru_cache(maxsize=1)
def _extraction_config() -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig
    return (LatexExtractionConfig(), ExprExtractionConfig())


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, alarm_s: int | None) -> tuple:
    # Eval grades 16 samples per gold, so each worker parses a gold once. Exceptions are not cached.
    from math_verify import parse

    return tuple(
        parse(
            _wrap_gold(gold),
            list(_extraction_config()),
            parsing_timeout=alarm_s,
            raise_on_error=True,
        )
    )


def verify_answer(answer: str, gold: str, timeout_s: float | None) -> tuple[bool, str]:
    """Grade one final answer -> (correct, status), status in {"ok", "timeout", "error: ..."}.

    Same result as math_verify.verify(parse(gold), parse(answer)) with its defaults, but failures
    are reported instead of silently scored 0: we compare each (gold, pred) candidate pair so a
    pair that raises does not hide another pair that matches. timeout_s=None turns math-verify's
    signal.alarm off (used in workers, where the parent's kill is the timeout).
    """
    from math_verify import parse, verify as mv_verify
    from math_verify.errors import TimeoutException  # a BaseException: `except Exception` misses it

    alarm_s = (
        None if timeout_s is None else max(1, math.ceil(timeout_s))
    )  # signal.alarm takes whole seconds
    try:
        golds = _parse_gold(gold, alarm_s)
        preds = parse(
            answer, list(_extraction_config()), parsing_timeout=alarm_s, raise_on_error=True
        )
    except TimeoutException:
        return False, "timeout"
    except Exception as e:  # noqa: BLE001 -- counted, never swallowed
        return False, f"error: {type(e).__name__}: {str(e)[:200]}"
    if not golds:
        return False, f"error: gold {gold!r} parsed to nothing"
    status = "ok"
    for g, p in itertools.product(golds, preds):
        try:
            if mv_verify(g, p, timeout_seconds=alarm_s, raise_on_error=True):
                return True, "ok"
        except TimeoutException:
            status = "timeout"
        except Exception as e:  # noqa: BLE001
            status = status if status == "timeout" else f"error: {type(e).__name__}: {str(e)[:200]}"
    return False, status


def verify(response: str, gold: str, think_in_prompt: bool = False, timeout_s: float = 5.0) -> bool:
    """True iff the final answer (after </think>) equals the gold under math-verify.

    Only the final answer is graded; an answer that appears only inside the thinking scores 0.
    Raises TimeoutError when math-verify's alarm (ceil(timeout_s) s per parse/comparison) fired and
    RuntimeError when math-verify raised, so a failure is never mistaken for a wrong answer.
    math-verify uses signal.alarm, so this must run in the MAIN thread; use grade() anywhere else.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "verify() uses signal.alarm and must run in the main thread; use grade()"
        )
    answer = common.split_thinking(response, think_in_prompt)[1]
    if not answer:  # unfinished thinking or empty final answer
        return False
    correct, status = verify_answer(answer, gold, timeout_s)
    if status == "timeout" and not correct:
        raise TimeoutError(f"math-verify timed out after {timeout_s}s on gold {gold!r}")
    if status.startswith("error") and not correct:
        raise RuntimeError(f"math-verify failed on gold {gold!r}: {status}")
    return correct


def _warm_up() -> None:
    verify_answer("1", "1", None)


def grade(responses: list[str], golds: list[str], think_in_prompt: bool = False,
          timeout_s: float = 5.0, workers: int | None = None) -> common.GradeReport:
    """Batched verify(): correct[i] = verify(responses[i], golds[i]), in input order.

    Each item gets timeout_s seconds of wall clock in a worker process; a hung item has its worker
    killed and replaced and is counted in `timeouts`; an exception in math-verify is counted in
    `errors`. Both score 0. Responses without a final answer score 0 without a round-trip.
    workers=None -> min(8, usable cores); workers=0 grades in this process (main thread only; only
    math-verify's own alarm, ceil(timeout_s) s per parse/comparison, no kill; for debugging).
    Workers (infra/grader_pool.py) start via forkserver, spawn where missing, which re-imports
    the main module: a script calling grade() needs the `if __name__ == "__main__":` guard.
    """
    if len(responses) != len(golds):
        raise ValueError(f"grade(): {len(responses)} responses but {len(golds)} golds")
    if not timeout_s > 0 or (workers is not None and workers < 0):
        raise ValueError(
            f"grade(): need timeout_s > 0 and workers >= 0, got {timeout_s}, {workers}"
        )
    t0 = time.monotonic()
    answers = [common.split_thinking(r, think_in_prompt)[1] for r in responses]
    jobs = [
        (i, a, str(g)) for i, (a, g) in enumerate(zip(answers, golds)) if a
    ]  # None/"" -> 0, no trip
    workers = grader_pool.default_workers() if workers is None else workers
    if workers == 0 or not jobs:
        if jobs and threading.current_thread() is not threading.main_thread():
            raise RuntimeError("grade(workers=0) uses signal.alarm and must run in the main thread")
        results = {i: verify_answer(a, g, timeout_s) for i, a, g in jobs}
    else:
        done = grader_pool.run(
            verify_answer,
            [(a, g, None) for _, a, g in jobs],
            timeout_s,
            workers,
            warm_up=_warm_up,
            preload=[__name__, "math_verify"],
        )
        results = {i: r for (i, _, _), r in zip(jobs, done)}
    report = common.GradeReport(correct=[False] * len(responses))
    for i, (ok, status) in sorted(results.items()):
        report.correct[i] = bool(ok)
        if status == "timeout":
            report.timed_out.append(i)
        elif status != "ok":
            report.errored.append(i)
        if status != "ok":
            report.details[i] = status
    report.timeouts, report.errors = len(report.timed_out), len(report.errored)
    report.seconds = time.monotonic() - t0
    return report
