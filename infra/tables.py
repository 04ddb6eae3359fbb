"""Result tables: mean ± std over seeds, summary.json's numbers ({mean, std, n}) and the compact
table printed at the end of a run (<= 100 columns, a world's HEADLINE columns), from the runs'
final.json contents (the experiment names each run's arm: `arm_of`).
Infrastructure only (the science is in the experiments, common.py and the worlds)."""
import textwrap

import numpy as np

import common


def stat(values) -> dict | None:
    """{"mean", "std" (population), "n"} over seeds; None and NaN left out; None if nothing left."""
    values = [float(v) for v in values if v is not None and v == v]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def stats(rows: list[dict]) -> dict:
    """{metric: stat over the rows} for every metric any row holds (numbers only, step left out)."""
    keys = dict.fromkeys(k for r in rows for k, v in r.items()
                         if k != "step" and not isinstance(v, (str, list, dict)))
    return {k: stat([r.get(k) for r in rows]) for k in keys}


def fmt_stat(st: dict | None, digits: int = 3) -> str:
    """'mean ± std' (the mean alone for one seed, 'n/a' for none), for printed tables."""
    if st is None:
        return "n/a"
    return f"{st['mean']:.{digits}f}" + (f" ± {st['std']:.{digits}f}" if st["n"] > 1 else "")


def headline(metrics: dict, columns: dict) -> dict[str, float | None]:
    """The compact table's values of one run's flat metrics: per column (a world's HEADLINE), the
    mean of the metrics whose keys start with its prefixes."""
    out = {}
    for col, (prefixes, _) in columns.items():
        vals = [next((v for k, v in metrics.items() if k.startswith(p) and "pass@" not in k), None)
                for p in prefixes]
        out[col] = None if None in vals else float(np.mean(vals))
    return out


def compact_table(rows: list[tuple[str, list[dict]]], world, first: str = "arm") -> str:
    """A markdown table that fits 100 columns: one row per (label, flat metrics of each seed), the
    world's HEADLINE columns as mean ± std over seeds, and its note."""
    table = []
    for label, runs in rows:
        values = [headline(r, world.HEADLINE) for r in runs]
        table.append({first: label, "seeds": len(runs),
                      **{col: fmt_stat(stat([v[col] for v in values]), digits)
                         for col, (_, digits) in world.HEADLINE.items()}})
    return format_table(table) + "\n" + textwrap.fill(world.HEADLINE_NOTE, 99)


def format_table(rows: list[dict]) -> str:
    """A markdown table of dicts (floats to 3 decimals)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def table_rows(finals: list[dict], arm_of, labels: dict | None = None
               ) -> list[tuple[str, list[dict]]]:
    """(label, last-step metrics per seed) per arm (final.json's `arm`, else arm_of(final)), the
    base (step 0, one evaluation per seed) first."""
    arms = [f.get("arm") or arm_of(f) for f in finals]
    rows = [((labels or {}).get(a, a), [f["final"] for f, b in zip(finals, arms) if b == a])
            for a in dict.fromkeys(arms)]
    return [("base (step 0)", list({f["seed"]: f["base"] for f in finals}.values()))] + rows


def summarize(finals: list[dict], arm_of) -> list[dict]:
    """summary.json: table_rows with every metric as {mean, std, n} over seeds."""
    return [{"arm": arm, "seeds": len(runs), **stats(runs)}
            for arm, runs in table_rows(finals, arm_of)]


def print_summary(finals: list[dict], out_dir: str, world, arm_of, labels: dict | None = None):
    """The compact table (<= 100 columns): base row first, then each arm; all in summary.json."""
    print(compact_table(table_rows(finals, arm_of, labels), world)
          + f"\nevery metric (mean, std, n over seeds): {out_dir}/summary.json")


def report(finals: list[dict], out_dir: str, world, arm_of, labels: dict | None = None) -> None:
    """The end of a sweep: <out_dir>/summary.json (summarize), then the compact table."""
    common.write_json_atomic(f"{out_dir}/summary.json", summarize(finals, arm_of))
    print_summary(finals, out_dir, world, arm_of, labels)
