"""Progress you can see: tqdm bars with an ETA on a terminal, today's plain lines in a log.

Exactly one of the two per process, chosen by whether stderr is a terminal: on a terminal (rank 0
of torchrun only) each long loop shows a tqdm bar on stderr, the step's values in its postfix, and
the per-step lines are not printed; otherwise (CI, reproduce_toy.sh's lane logs, a pipe, the other
ranks) no bar is drawn and the per-step lines are printed as they always were. Inner bars vanish
when done; the outermost one (a sweep's, or a lone run's steps) stays.
Infrastructure only (the science is in the experiments, common.py and the worlds)."""
from __future__ import annotations

import sys

from tqdm import tqdm

from infra import parallel


# tqdm's default less the percentage and the rate, to leave a step's values room in 100 columns:
# "sdpo_s: 2/60 |█       | 00:41<19:52, reward=0.938, len=17.0, doubt=2.56, loss=+1.07e-01"
FORMAT = "{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}{postfix}"


def on_terminal() -> bool:
    """Bars, not lines: rank 0 with stderr a terminal."""
    return parallel.is_main() and sys.stderr.isatty()


def bar(iterable, desc: str, total: int | None = None, **kwargs) -> tqdm:
    """`iterable` under a tqdm bar (ETA, rate) on a terminal; elsewhere a disabled tqdm that only
    iterates (its set_postfix does nothing). kwargs go to tqdm (e.g. initial= for a resume)."""
    return tqdm(iterable, desc=desc, total=total, disable=not on_terminal(), leave=None,
                dynamic_ncols=True, bar_format=FORMAT, **kwargs)


def report(steps: tqdm, head: str, **values: str) -> None:
    """After one step: on a terminal the values become the bar's postfix (reward=0.500, ...);
    otherwise rank 0 prints the log line `head key value key value ...`."""
    if not steps.disable:
        steps.set_postfix(values, refresh=False)  # in the given order (kwargs: sorted)
    elif parallel.is_main():
        print(" ".join([head] + [f"{k} {v}" for k, v in values.items()]), flush=True)


def say(line: str) -> None:
    """One line on stdout from rank 0, printed above any bar on a terminal (not through it)."""
    if parallel.is_main():
        with tqdm.external_write_mode():
            print(line, flush=True)
