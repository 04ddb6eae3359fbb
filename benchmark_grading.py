"""Benchmark the batched math-verify grader (math_world.grade, workers from infra/grader_pool.py)
on a realistic mix of responses.

    python benchmark_grading.py [--n 2000] [--workers 2] [--timeout 5]
        [--out results/bench/grading.json]

The mix imitates evaluation: groups of 16 samples per gold; correct and wrong boxed integers,
fractions vs decimals, intervals, LaTeX expressions (roots, pi, polynomials, matrices, bare-LaTeX
golds), plain-text answers and unfinished thinking. Every item's expected grade is known, so the
run also reports disagreements. Pathological items (power towers that hang sympy, a 5,000-digit
number that makes math-verify raise) are graded in a separate call so that `responses_per_s` is
the steady-state rate and the cost of a hang (about timeout_s of one worker) is reported on its own.
"""
import argparse
import json
import os
import platform
import random
import time

from common import write_json_atomic
from infra.run_dirs import environment_info
from infra.grader_pool import default_workers as default_grade_workers
from math_world import grade

FILLER = ("Let me set up the equations. Wait, maybe I should check the constraint again. Hmm, the "
          "discriminant seems positive, so perhaps there are two roots. Actually, let me verify "
          "the arithmetic: it might be likely off by one. Alternatively, substitute back. ")


def group(rng: random.Random, kind: str) -> tuple[str, list[tuple[str, bool]]]:
    """A gold and the answers that samples may give: [(final answer text, expected correct)]."""
    a, b = rng.randint(1, 999), rng.randint(2, 97)
    wrong = [(rf"The answer is $\boxed{{{a + d}}}$.", False) for d in rng.sample(range(1, 60), 3)]
    if kind == "int":
        return str(a), [(rf"The answer is $\boxed{{{a}}}$.", True),
                        (f"The final answer is {a}.", True)] + wrong
    if kind == "frac":  # equivalent forms, a decimal where exact, and wrong fractions
        forms = [rf"\frac{{{a}}}{{{b}}}", rf"\dfrac{{{2 * a}}}{{{2 * b}}}", f"{a}/{b}"]
        ok = [(rf"So the probability is $\boxed{{{f}}}$.", True) for f in forms]
        return rf"\frac{{{a}}}{{{b}}}", ok + [(rf"So $\boxed{{\frac{{{a + 1}}}{{{b}}}}}$.", False)]
    if kind == "half":  # math-verify equates 1/2 and 0.5 (6 decimals)
        return r"\frac{1}{2}", [(r"Thus $\boxed{0.5}$.", True), (r"Thus $\boxed{\frac12}$.", True),
                                (r"Thus $\boxed{0.6}$.", False)]
    if kind == "interval":
        lo, hi = sorted(rng.sample(range(-20, 20), 2))
        return f"({lo}, {hi}]", [(rf"The solution set is $\boxed{{({lo},{hi}]}}$.", True),
                                 (rf"The solution set is $\boxed{{[{lo},{hi}]}}$.", False),
                                 (rf"The solution set is $\boxed{{({lo},{hi})}}$.", False)]
    if kind == "latex":
        return rng.choice([
            (r"3\sqrt{13}", [(r"$\boxed{3\sqrt{13}}$", True), (r"$\boxed{\sqrt{117}}$", True),
                            (r"$\boxed{13\sqrt{3}}$", False)]),
            (r"\frac{\pi}{4}", [(r"$\boxed{\frac{1}{4}\pi}$", True), (r"$\boxed{\pi/4}$", True),
                               (r"$\boxed{\frac{\pi}{2}}$", False)]),
            ("x^2+2x+1", [(r"$\boxed{(x+1)^2}$", True), (r"$\boxed{x^2+2x+1}$", True),
                          (r"$\boxed{(x-1)^2}$", False)]),
            (r"\left( 3, \frac{\pi}{2} \right)", [(r"$\boxed{(3, \frac{\pi}{2})}$", True),
                                                (r"$\boxed{(3, \pi)}$", False)]),
            (r"\begin{pmatrix} -1 \\ 2 \end{pmatrix}",
             [(r"$\boxed{\begin{pmatrix} -1 \\ 2 \end{pmatrix}}$", True),
              (r"$\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}$", False)]),
            (r"(-\infty, 2) \cup (3, \infty)", [(r"$\boxed{(-\infty,2)\cup(3,\infty)}$", True),
                                               (r"$\boxed{(-\infty,2]\cup[3,\infty)}$", False)]),
        ])
    raise ValueError(kind)


KINDS = {"int": 0.55, "frac": 0.15, "half": 0.03, "interval": 0.10, "latex": 0.17}
# share of samples whose thinking never ends (graded 0 without a worker round-trip)
UNFINISHED = 0.05

PATHOLOGICAL = [  # (answer, gold, what to expect)
    (r"$\boxed{9^{9^{9^{9^{9}}}}}$", "1", "timeout"),
    (r"$\boxed{10^{10^{10^{10}}}}$", "7", "timeout"),
    ("The answer is " + "1" * 5000, "1", "error"),
    (r"$\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}$", "1", "timeout or wrong"),
]


def build_mix(n: int, seed: int) -> tuple[list[str], list[str], list[bool]]:
    """Groups of 16 samples per gold (as in avg@16); each sample draws its own answer, so answer
    strings vary within a group the way real samples do."""
    rng = random.Random(seed)
    responses, golds, expected = [], [], []
    while len(responses) < n:
        gold, answers = group(rng, rng.choices(list(KINDS), weights=list(KINDS.values()))[0])
        for _ in range(min(16, n - len(responses))):
            thinking = FILLER * rng.randint(5, 40)
            if rng.random() < UNFINISHED:
                responses.append(f"<think>\n{thinking}")
                expected.append(False)
            else:
                answer, ok = rng.choice(answers)
                responses.append(f"<think>\n{thinking}</think>\n\n{rng.randint(1, 99)}. "
                                 f"Summary of the steps. {answer}")
                expected.append(ok)
            golds.append(gold)
    return responses, golds, expected


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="responses in the normal mix")
    p.add_argument("--workers", type=int, default=None,
                   help="grading processes (default: min(8, cores)); 0 = in-process")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="per-item wall-clock limit in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench/grading.json")
    args = p.parse_args()
    workers = default_grade_workers() if args.workers is None else args.workers
    responses, golds, expected = build_mix(args.n, args.seed)
    load_before = os.getloadavg()[0]  # other jobs on the machine slow the graders down: record it

    t0 = time.monotonic()
    # start the pool
    grade(["<think>a</think>$\\boxed{1}$"], ["1"], timeout_s=args.timeout, workers=workers)
    pool_start_s = time.monotonic() - t0
    report = grade(responses, golds, timeout_s=args.timeout, workers=workers)
    mismatches = [i for i, (c, e) in enumerate(zip(report.correct, expected)) if c != e]
    patho = grade([f"<think>x</think>{a}" for a, _, _ in PATHOLOGICAL],
                  [g for _, g, _ in PATHOLOGICAL], timeout_s=args.timeout, workers=workers)

    result = {
        "n": len(responses), "workers": workers, "timeout_s": args.timeout, "seed": args.seed,
        "seconds": round(report.seconds, 3),
        "responses_per_s": round(len(responses) / report.seconds, 1),
        "pool_start_s": round(pool_start_s, 3), "accuracy": round(report.summary()["accuracy"], 4),
        "timeouts": report.timeouts, "errors": report.errors,
        "expected_mismatches": len(mismatches),
        "mismatch_examples": [{"gold": golds[i],
                               "answer": responses[i].rsplit("</think>", 1)[-1].strip()[:200],
                               "expected": expected[i]} for i in mismatches[:5]],
        "pathological": {"n": len(PATHOLOGICAL), "seconds": round(patho.seconds, 3),
                         "timeouts": patho.timeouts,
                         "errors": patho.errors, "expected": [e for _, _, e in PATHOLOGICAL],
                         "timed_out": patho.timed_out, "errored": patho.errored},
        "machine": {**environment_info(),
                    "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0]},
    }
    print(json.dumps(result, indent=2))
    write_json_atomic(args.out, result)  # tmp file + os.replace
    print(f"wrote {args.out}")


if __name__ == "__main__":  # required: grading workers re-import the main module when they start
    main()
