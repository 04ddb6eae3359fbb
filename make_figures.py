"""make_figures.py — every figure, both tables and the claims report (C1–C5), from results/ only.

Reads the files the experiments write (claims in ../shared/docs/PAPER.md):

  results/exp01/seed<k>/final.json                       Table 1 (C1) and Table 2 (C2)
  results/exp02/<arm>/seed<k>/metrics.jsonl              GRPO vs SDPO c=s vs SDPO c=s\\think (C3)
  results/exp03/ema<tau>/seed<k>/metrics.jsonl           frozen vs EMA teacher (C4)
  results/exp04/<coverage>/<arm>/seed<k>/metrics.jsonl   task coverage (C5)
  results/controls/drop_hedge/exp02/sdpo_s/seed<k>/      token-vs-behaviour control (optional)

and writes into <results>/figures/ one PNG per figure with the CSV of the numbers it plots (mean,
population std and number of seeds per point; the first line, `# ...`, holds the definitions),
Table 1 and Table 2 as CSV, and the claims report (printed and written to <results>/claims.md).

  python make_figures.py                         # every figure and the claims report
  python make_figures.py --only exp02,exp03      # a subset of the figures (the report covers all)
  python make_figures.py --claims                # print the claims report only; writes nothing
  python make_figures.py --results runs          # your own runs (the scripts write to runs/<exp>/ by default)

Each claims row compares two per-seed quantities A → B (e.g. OOD accuracy at step 0 → at the last
evaluation of SDPO c=s) and judges Δ = B − A, paired by seed: "yes" when Δ has the paper's sign in
every seed, "partly" when only the mean over seeds has it, "no" otherwise, "n/a" when missing.
Only finished runs (with final.json) are read; a metrics.jsonl line cut by a crash at the end is
ignored. Imports numpy, pandas and matplotlib only (no torch), so it runs anywhere in seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

WORDS = ("wait", "hmm", "perhaps", "maybe", "actually", "alternatively", "seems", "might", "likely", "check")
ACCURACY = {  # name -> the evaluation sets whose avg@k it averages
    "toy": {"held-out accuracy": ["in_domain"], "OOD accuracy": ["ood_d4", "ood_d5", "ood_l5"]},
    "math": {"OOD accuracy": ["aime24"], "AMC23 accuracy": ["amc23"]},
}
REF_SET = {"toy": "in_domain", "math": "aime24"}  # where the change in epistemic counts is measured
DEFINITIONS = {
    "toy": "held-out accuracy = eval in_domain avg@1; OOD accuracy = mean avg@1 over ood_d4, ood_d5, ood_l5; "
           "epistemic counts per response on in_domain",
    "math": "OOD accuracy = aime24 avg@16; AMC23 accuracy = amc23 avg@16; epistemic counts per response on aime24",
}
SEEDS = "--seeds 0,1,2"
DROP_HEDGE = "results/controls/drop_hedge"
COMMANDS = {  # what reproduce_toy.sh runs for each part (exp03 and exp04 on reduced sweeps)
    "exp01": f"python exp01_offpolicy.py {SEEDS} --out-dir results/exp01",
    "exp02": f"python exp02_onpolicy_grpo_sdpo.py {SEEDS} --out-dir results/exp02",
    "exp03": f"python exp03_ema_teacher.py --ema-rates 0,0.05,0.2 {SEEDS} --out-dir results/exp03",
    "exp04": f"python exp04_coverage.py --coverages 1,64,fresh {SEEDS} --out-dir results/exp04",
    "controls": f"python toy_world.py pretrain --init-from toy_model --p-drop-hedge 0.5 --seed 3 --steps 2000 --lr 5e-4 "
                f"--out-dir {DROP_HEDGE}/model && python exp02_onpolicy_grpo_sdpo.py --model {DROP_HEDGE}/model "
                f"--method sdpo --teacher-context s {SEEDS} --out-dir {DROP_HEDGE}/exp02",
}
NEEDS = {"exp01": ["exp01"], "exp02": ["exp02"], "exp03": ["exp03"], "exp04": ["exp04"], "controls": ["exp01"]}
RUN_DIRS = {"controls": "controls/drop_hedge/exp02"}  # the others: results/<name>
EXPECT = {"> 0": lambda d: d > 0, "< 0": lambda d: d < 0, "≥ 0": lambda d: d >= 0}  # the paper's sign of a difference


class MissingResults(Exception):
    """A result the requested output needs is not there; the message names the command that makes it."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default="results", help="results tree to read: results (the reference runs) or runs (the scripts' default --out-dir); figures go to <results>/figures/")
    p.add_argument("--only", default="", help=f"comma-separated figures to build: {','.join(NEEDS)} (default: all)")
    p.add_argument("--claims", action="store_true", help="print the claims report only (no figure, no file written)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Reading results
# ---------------------------------------------------------------------------------------------
def read_metrics(run: Path) -> pd.DataFrame:
    """metrics.jsonl -> one row per step, sorted; an unparseable last line (cut by a crash) is ignored."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path} line {i + 1} is not JSON (only a last line may be cut)") from None
    if not rows:
        raise ValueError(f"{path} has no metrics although the run has final.json")
    return pd.DataFrame(rows).drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def finished_runs(root: Path) -> dict[str, dict[int, Path]]:
    """{arm path below root ('' for root itself): {seed: run directory}} of runs with final.json."""
    found = {}
    for final in sorted(root.glob("**/seed*/final.json")):
        run = final.parent
        if run.name[4:].isdigit():
            rel = run.parent.relative_to(root)
            found.setdefault("" if rel == Path(".") else rel.as_posix(), {})[int(run.name[4:])] = run
    return found


def world_of(keys) -> str:
    """The world, from the evaluation set names present (the math benchmarks, or the toy cells)."""
    return "math" if any(re.search(r"(^|/)(aime24|aime25|amc23|math500)/", k) for k in keys) else "toy"


def with_accuracies(m, prefix: str):
    """Add `<prefix><name>` for each accuracy of ACCURACY (mean of avg@k over its sets) to a flat
    metrics dict or DataFrame, where all its sets are present."""
    keys = list(m)
    avg = next((k.rsplit("/", 1)[1] for k in keys if re.search(r"/avg@\d+$", k)), None)
    for name, sets in ACCURACY[world_of(keys)].items():
        cols = [f"{prefix}{s}/{avg}" for s in sets]
        if avg and all(c in keys for c in cols):
            m[prefix + name] = sum(m[c] for c in cols) / len(cols)
    return m


def load(results: Path, name: str):
    """exp01: {seed: final.json}; the others: {arm: {seed: metrics DataFrame}}; None when absent."""
    root = results / RUN_DIRS.get(name, name)
    found = finished_runs(root) if root.is_dir() else {}
    if name != "exp01":
        return {arm: {seed: with_accuracies(read_metrics(run), "eval/") for seed, run in runs.items()}
                for arm, runs in found.items() if arm} or None
    finals = {seed: json.loads((run / "final.json").read_text()) for seed, run in found.get("", {}).items()}
    for seed, f in finals.items():
        if "base" not in f.get("table2", {}) or "table1" not in f:
            raise ValueError(f"{found[''][seed] / 'final.json'} has no table1 or no table2 with a base model")
        for model in f["table2"].values():
            with_accuracies(with_accuracies(model, "eval/"), "eval_forced/")
    return finals or None


def data_world(data: dict) -> str:
    """The world of a results tree (one tree holds one world), from its evaluation set names."""
    keys = [k for f in (data["exp01"] or {}).values() for k in f["table2"]["base"]]
    keys += [k for name in ("exp02", "exp03", "exp04") for runs in (data[name] or {}).values()
             for df in runs.values() for k in df.columns]
    return world_of(keys)


def missing_message(results: Path, name: str) -> str:
    return f"{results / RUN_DIRS.get(name, name)} is missing or holds no finished run: run `{COMMANDS[name]}`"


# ---------------------------------------------------------------------------------------------
# Per-seed values and statistics
# ---------------------------------------------------------------------------------------------
def first(runs: dict, key: str) -> dict[int, float]:
    """Per seed, the first logged value (step 0 for eval keys: the base; step 1 for train keys)."""
    return {seed: float(df[key].dropna().iloc[0]) for seed, df in runs.items() if key in df and df[key].notna().any()}


def last(runs: dict, key: str) -> dict[int, float]:
    """Per seed, the last logged value (the final evaluation, or the last training step)."""
    return {seed: float(df[key].dropna().iloc[-1]) for seed, df in runs.items() if key in df and df[key].notna().any()}


def paired(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """b − a for every seed both sides have."""
    return {seed: b[seed] - a[seed] for seed in sorted(a) if seed in b}


def delta(runs: dict, key: str) -> dict[int, float]:
    return paired(first(runs, key), last(runs, key))


def exp01_values(ex01: dict | None, table: str, row: str, key: str) -> dict[int, float]:
    """Per seed, final.json[table][row][key] of exp01 (a context or model without it is left out)."""
    return {seed: f[table][row][key] for seed, f in (ex01 or {}).items() if key in f[table].get(row, {})}


def stats(values) -> tuple[float, float, int]:
    """(mean, population std, n) of the finite values (a dict: of its values, e.g. per seed)."""
    values = values.values() if isinstance(values, dict) else values
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    return (float(np.mean(v)), float(np.std(v)), len(v)) if v else (math.nan, math.nan, 0)


def mean_std(values, signed: bool = False, digits: int | None = None) -> str:
    """'mean ± std', by default with 1 decimal from 10 up (lengths, counts), else 3; 'n/a' if empty."""
    m, s, n = stats(values)
    digits = digits if digits is not None else 1 if abs(m) >= 10 else 3
    return "n/a" if not n else f"{m:{'+' if signed else ''},.{digits}f} ± {s:,.{digits}f}"


def direction(diffs: dict[int, float], expect: str) -> str:
    """'yes' when the paper's sign (EXPECT) holds for the difference of every seed, 'partly' when it
    holds for their mean only, 'no' otherwise, 'n/a' without any seed."""
    values = [d for d in diffs.values() if math.isfinite(d)]
    if not values:
        return "n/a"
    if all(EXPECT[expect](d) for d in values):
        return "yes"
    return "partly" if EXPECT[expect](float(np.mean(values))) else "no"


# ---------------------------------------------------------------------------------------------
# Figures. A builder returns points (panel, series, x, mean, std, n): a panel whose x are steps is
# drawn as lines (mean, shaded ± std), any other as grouped bars (± std); a series "A · B" takes A's
# colour and B's line style; a series ending in "+ forcing" is hatched.
# ---------------------------------------------------------------------------------------------
def point(panel: str, series: str, x, values) -> dict:
    m, s, n = stats(values)
    return {"panel": panel, "series": series, "x": x, "mean": m, "std": s, "n": n}


def curve(panel: str, series: str, runs: dict, key: str) -> list[dict]:
    """One point per logged step of `key`, over the seeds that logged it."""
    cols = {seed: df.set_index("step")[key] for seed, df in runs.items() if key in df}
    wide = pd.DataFrame(cols).dropna(how="all") if cols else pd.DataFrame()  # (steps, seeds)
    return [point(panel, series, int(step), row.to_numpy()) for step, row in wide.iterrows()]


def stat_table(groups: dict[tuple, list[dict]], id_cols: list[str], keys: list[str]) -> pd.DataFrame:
    """A table: one row per group, the mean and std of each key over its seeds' metric dicts."""
    rows = []
    for ids, dicts in groups.items():
        row = dict(zip(id_cols, ids), seeds=sum(any(k in d for k in keys) for d in dicts))
        for k in keys:
            row[f"{k} mean"], row[f"{k} std"], _ = stats([d.get(k) for d in dicts])
        rows.append(row)
    return pd.DataFrame(rows)


def fig_table1(ex01: dict) -> tuple[list[dict], pd.DataFrame]:
    contexts = list(dict.fromkeys(c for f in ex01.values() for c in f["table1"]))
    pts = [point(key, "", c, exp01_values(ex01, "table1", c, key))
           for key in ("accuracy", "response_length", "epistemic/total") for c in contexts]
    pts += [point("epistemic/<word> per response", f"c = {c}", w, exp01_values(ex01, "table1", c, f"epistemic/{w}"))
            for c in ("none", "s") for w in WORDS]
    keys = ["questions", "accuracy", "response_length", "epistemic/total", "epistemic/total_per_1k_tokens",
            "epistemic_word/total"] + [f"epistemic/{w}" for w in WORDS]
    return pts, stat_table({(c,): [f["table1"].get(c, {}) for f in ex01.values()] for c in contexts}, ["context"], keys)


def fig_table2(ex01: dict) -> tuple[list[dict], pd.DataFrame]:
    models = list(dict.fromkeys(m for f in ex01.values() for m in f["table2"]))
    metrics = list(dict.fromkeys(k for f in ex01.values() for m in f["table2"].values() for k in m))
    avg = next((k.rsplit("/", 1)[1] for k in metrics if re.search(r"/avg@\d+$", k)), "avg@1")
    sets = list(dict.fromkeys(k.split("/")[1] for k in metrics if k.startswith("eval/") and k.endswith("/" + avg)))
    variants = [("eval/", "")] + ([("eval_forced/", " + forcing")] if any(k.startswith("eval_forced/") for k in metrics)
                                  else [])
    pts = [point(panel, model + suffix, s, exp01_values(ex01, "table2", model, f"{prefix}{s}/{metric}"))
           for panel, metric in ((f"accuracy ({avg}) per evaluation set", avg),
                                 ("epistemic/total per response", "epistemic/total"))
           for prefix, suffix in variants for model in models for s in sets]
    keys = [k for k in metrics if re.search(r"(avg@\d+|pass@\d+|response_length|epistemic/total|accuracy)$|^sft/", k)]
    return pts, stat_table({(m,): [f["table2"].get(m, {}) for f in ex01.values()] for m in models}, ["model"], keys)


def fig_onpolicy(arms: dict[str, dict], world: str) -> list[dict]:
    """Per arm: training score and response length per step, the accuracies at each evaluation, and
    the change in epistemic counts per word on the reference set (final − base, per seed)."""
    ref, pts = REF_SET[world], []
    for arm, runs in arms.items():
        pts += curve("training score (train/reward)", arm, runs, "train/reward")
        pts += curve("response length (train/response_length)", arm, runs, "train/response_length")
        for name in ACCURACY[world]:
            pts += curve("accuracy (eval)", f"{arm} · {name}", runs, f"eval/{name}")
        pts += [point(f"Δ epistemic per response on {ref} (final − base)", arm, w,
                      delta(runs, f"eval/{ref}/epistemic/{w}")) for w in (*WORDS, "total")]
    return pts


def fig_ema(taus: dict[str, dict], world: str) -> list[dict]:
    taus = dict(sorted(taus.items(), key=lambda kv: float(kv[0].removeprefix("ema"))))
    pts = fig_onpolicy(taus, world)
    for tau, runs in taus.items():
        for kind in ("epistemic", "other"):
            pts += curve("teacher–student divergence per token", f"{tau} · {kind} tokens", runs,
                         f"train/sdpo/divergence_{kind}")
    return pts


def coverage_order(name: str) -> float:
    """cov1 < cov8 < ... < fresh; the paper's files by their first number (seen_1x64 -> 1)."""
    digits = re.search(r"\d+", name)
    return math.inf if name == "fresh" or not digits else int(digits.group())


def fig_coverage(ex04: dict[str, dict], world: str) -> list[dict]:
    covs = sorted({k.split("/")[0] for k in ex04}, key=coverage_order)
    arms = list(dict.fromkeys(k.split("/")[1] for k in ex04))
    ood, pts = "OOD accuracy: base (step 0) and final", []
    for cov in covs:
        pts.append(point(ood, "base (step 0)", cov, first(ex04.get(f"{cov}/{arms[0]}", {}), "eval/OOD accuracy")))
        for arm in arms:
            runs = ex04.get(f"{cov}/{arm}", {})
            pts.append(point("final training score (train/reward, last step)", arm, cov, last(runs, "train/reward")))
            pts.append(point("final response length (last step)", arm, cov, last(runs, "train/response_length")))
            pts.append(point(ood, f"{arm} final", cov, last(runs, "eval/OOD accuracy")))
            pts += curve("training score per step (train/reward)", f"{cov} · {arm}", runs, "train/reward")
    return pts


def fig_controls(ex01: dict, ctrl: dict | None, ex02: dict | None, world: str) -> list[dict]:
    """SDPO c=s from the shipped base vs the drop_hedge base (base and final); accuracy of the exp01
    models with and without budget forcing."""
    pts = []
    shipped, drop_hedge = (ex02 or {}).get("sdpo_s", {}), (ctrl or {}).get("sdpo_s", {})
    for label, runs in (("shipped base", shipped), ("drop_hedge base", drop_hedge)):
        for key in (f"eval/{REF_SET[world]}/epistemic/total", "eval/held-out accuracy", "eval/OOD accuracy"):
            pts.append(point(f"SDPO c=s: {key.removeprefix('eval/')}", "step 0", label, first(runs, key)))
            pts.append(point(f"SDPO c=s: {key.removeprefix('eval/')}", "final", label, last(runs, key)))
    for name in ACCURACY[world]:
        for model in ("base", "D_ug", "D_sg"):
            for prefix, suffix in (("eval/", ""), ("eval_forced/", " + forcing")):
                pts.append(point(f"budget forcing: {name}", f"accuracy{suffix}", model,
                                 exp01_values(ex01, "table2", model, prefix + name)))
    return pts


def color(series: str, colors: dict) -> str:
    key = series.split(" · ")[0].removesuffix(" + forcing")
    return colors.setdefault(key, f"C{len(colors) % 10}")


def draw_lines(ax, part: pd.DataFrame, colors: dict) -> None:
    variants = list(dict.fromkeys(s.partition(" · ")[2] for s in part.series))
    for series, g in part.groupby("series", sort=False):
        x, c = g.x.astype(float), color(series, colors)
        style = ("-", "--", ":")[variants.index(series.partition(" · ")[2]) % 3]
        ax.plot(x, g["mean"], style, color=c, label=series, marker="o" if len(g) < 8 else None, ms=3)
        ax.fill_between(x, g["mean"] - g["std"], g["mean"] + g["std"], color=c, alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")


def draw_bars(ax, part: pd.DataFrame, colors: dict) -> None:
    xs, series = list(dict.fromkeys(part.x)), list(dict.fromkeys(part.series))
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        g = part[part.series == s].set_index("x").reindex(xs)
        ax.bar(np.arange(len(xs)) + (i - (len(series) - 1) / 2) * width, g["mean"], width, yerr=g["std"].fillna(0),
               color=color(s, colors), hatch="//" if s.endswith("+ forcing") else None, label=s or None,
               capsize=2, edgecolor="black", linewidth=0.3)
    ax.set_xticks(range(len(xs)), xs, rotation=30 if len(xs) > 5 else 0, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.5)


def save_figure(out: Path, name: str, pts: list[dict], note: str) -> None:
    """<name>.csv (a `# note` line, then the points) and <name>.png (one panel per `panel`)."""
    frame = pd.DataFrame([p for p in pts if p["n"]])
    if frame.empty:
        print(f"note: {name}: nothing to plot, skipped")
        return
    with open(out / f"{name}.csv", "w") as f:
        f.write(f"# {name}: {note}; mean and population std over seeds, n = seeds per point\n")
        frame.to_csv(f, index=False)
    panels = list(dict.fromkeys(frame.panel))
    ncols = 2 if len(panels) == 4 else min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    colors = {}
    for ax, panel in zip(axes.flat, panels):
        part = frame[frame.panel == panel]
        (draw_lines if all(isinstance(x, (int, np.integer)) for x in part.x) else draw_bars)(ax, part, colors)
        ax.set_title(panel, fontsize=9)
        if any(part.series):
            ax.legend(fontsize=6)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    seeds = sorted({int(frame.n.min()), int(frame.n.max())})
    fig.suptitle(f"{name}: mean ± std over seeds (n = {'–'.join(map(str, seeds))})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)


def build_figures(only: list[str], data: dict, world: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    note = DEFINITIONS[world]
    if "exp01" in only:
        for name, build in (("exp01_table1", fig_table1), ("exp01_table2", fig_table2)):
            pts, table = build(data["exp01"])
            table.to_csv(out / f"{name.removeprefix('exp01_')}.csv", index=False)
            save_figure(out, name, pts, note + "; '+ forcing' = evaluated with budget forcing (`wait`)")
    for name, key, build in (("exp02_onpolicy", "exp02", fig_onpolicy), ("exp03_ema", "exp03", fig_ema),
                             ("exp04_coverage", "exp04", fig_coverage)):
        if key in only:
            save_figure(out, name, build(data[key], world), note + "; Δ = final eval − step-0 eval, per seed")
    if "controls" in only:
        pts = fig_controls(data["exp01"], data["controls"], data["exp02"], world)
        save_figure(out, "controls", pts, note + "; drop_hedge = base continued-pretrained without half the `maybe`s")


# ---------------------------------------------------------------------------------------------
# Claims report: each row compares two per-seed quantities A → B; direction() judges B − A.
# ---------------------------------------------------------------------------------------------
def claim(name: str, compared: str, paper: str, a: dict, b: dict, expect: str) -> dict:
    """One row; ours = A and B over the seeds both have, and Δ = B − A paired by seed."""
    d = paired(a, b)
    digits = 1 if max([abs(v) for v in (*a.values(), *b.values())] or [0]) >= 10 else 3  # one format per row
    ab = " → ".join(mean_std([side[s] for s in d], digits=digits) for side in (a, b))
    ours = f"{ab} (Δ {mean_std(d, True, digits)}, n = {len(d)})" if d else "n/a"
    return {"claim": name, "what is compared": compared, "paper": paper, "ours (mean ± std over seeds)": ours,
            "expected sign of Δ": expect, "direction reproduces": direction(d, expect)}


def change(key: str) -> str:
    return "step 1 (base rollouts) → last step" if key.startswith("train/") else "base → final"


def within(name: str, runs: dict, arm: str, key: str, paper: str, expect: str) -> dict:
    """A claim on one arm: `key` at the start → at the end of training."""
    return claim(name, f"{key.removeprefix('eval/')}, {change(key)}, {arm}", paper, first(runs, key), last(runs, key),
                 expect)


def between(name: str, key: str, arms: tuple[str, str], runs: tuple[dict, dict], paper: str, expect: str) -> dict:
    """A claim across two arms: the change of `key` over training (as in within()) in arm A → in arm B."""
    return claim(name, f"Δ {key.removeprefix('eval/')} ({change(key)}), {arms[0]} → {arms[1]}", paper,
                 delta(runs[0], key), delta(runs[1], key), expect)


def claims(data: dict, world: str) -> tuple[list[dict], list[dict]]:
    """Rows C1–C5 (paper numbers from PAPER.md) and the rows of the toy-world controls."""
    ex01, ex02, ex03, ex04, ctrl = (data[k] or {} for k in ("exp01", "exp02", "exp03", "exp04", "controls"))
    t1 = lambda row, key: exp01_values(ex01, "table1", row, key)  # noqa: E731
    t2 = lambda row, key: exp01_values(ex01, "table2", row, key)  # noqa: E731
    rows = [claim(f"C1 {name}", f"{key}, context {a} → {b} (Table 1)", paper, t1(a, key), t1(b, key), expect)
            for name, key, a, b, paper, expect in [
                ("accuracy", "accuracy", "none", "s", "0.30 → 0.98", "> 0"),
                ("length", "response_length", "none", "s", "13,054 → 1,873 tokens", "< 0"),
                ("epistemic", "epistemic/total", "none", "s", "182.5 → 8.8 per response", "< 0"),
                ("`wait`", "epistemic/wait", "none", "s", "83.8 → 3.0 per response", "< 0"),
                ("s\\think weaker", "epistemic/total", "s", "s_nothink", "8.8 → 159.8", "> 0"),
                ("regenerated", "epistemic/total", "none", "regenerated", "182.5 → 24.1", "< 0")]]
    rows += [claim(f"C2 {name}", f"OOD accuracy, {a} → {b} (Table 2)", paper, t2(a, "eval/OOD accuracy"),
                   t2(b, "eval/OOD accuracy"), expect) for name, a, b, paper, expect in [
                ("D_sg degrades", "base", "D_sg", "AIME24 avg@16 54.79 → 20.21", "< 0"),
                ("D_ug does not", "D_sg", "D_ug", "20.21 → 51.04 (base 54.79)", "> 0")]]
    ref, ood = REF_SET[world], "eval/OOD accuracy"
    wait, total = f"eval/{ref}/epistemic/wait", f"eval/{ref}/epistemic/total"
    sdpo, grpo, nothink = (ex02.get(arm, {}) for arm in ("sdpo_s", "grpo", "sdpo_s_nothink"))
    rows += [
        within("C3 epistemic", sdpo, "SDPO c=s", wait, "Δ`wait` −60.8", "< 0"),
        between("C3 epistemic vs GRPO", wait, ("GRPO", "SDPO c=s"), (grpo, sdpo), "Δ`wait` +28.5 → −60.8", "< 0"),
        within("C3 length", sdpo, "SDPO c=s", "train/response_length", "~13k → ~5k tokens", "< 0"),
        within("C3 OOD accuracy", sdpo, "SDPO c=s", ood, "AIME24 −~40 %, AMC23 −~15 % (relative)", "< 0"),
        within("C3 GRPO", grpo, "GRPO (keeps or improves)", ood, "AIME24 54.7 → 56.0, AMC23 89.3 → 91.1", "≥ 0"),
        between("C3 s\\think weaker", total, ("SDPO c=s", "SDPO c=s\\think"), (sdpo, nothink), "weaker (no number)",
                "> 0")]
    taus = sorted((float(k.removeprefix("ema")), k) for k in ex03)  # the paper's tau = 0.05, else the smallest > 0
    moving = next((k for t, k in taus if t == 0.05), next((k for t, k in taus if t > 0), "ema0.05"))
    pair, runs = ("ema0 (frozen)", moving), (ex03.get("ema0", {}), ex03.get(moving, {}))
    rows += [between("C4 epistemic", total, pair, runs, "EMA amplifies the collapse (no number)", "< 0"),
             between("C4 length", "train/response_length", pair, runs, "(no number)", "< 0"),
             between("C4 OOD accuracy", ood, pair, runs, "(no number)", "< 0")]
    covs = sorted({k.split("/")[0] for k in ex04}, key=coverage_order) or ["narrowest", "broadest"]
    narrow, broad = ex04.get(f"{covs[0]}/sdpo_s", {}), ex04.get(f"{covs[-1]}/sdpo_s", {})
    rows += [
        within("C5 narrow: in-domain gain", narrow, f"SDPO c=s on {covs[0]}", "train/reward", "fast gains (1 question)",
               "> 0"),
        within("C5 narrow: short answers", narrow, f"SDPO c=s on {covs[0]}", "train/response_length", "short answers",
               "< 0"),
        within("C5 broad: OOD falls", broad, f"SDPO c=s on {covs[-1]}", ood, "OOD falls (broad coverage)", "< 0"),
        between("C5 coverage decides", ood, (f"SDPO c=s on {covs[0]}", covs[-1]), (narrow, broad),
                "lower as coverage broadens", "< 0")]
    forced = [claim(f"budget forcing: {name}", f"{name} of SFT-D_sg, plain → with forced `wait`",
                    "toy control: does the word alone help?", t2("D_sg", f"eval/{name}"), t2("D_sg", f"eval_forced/{name}"),
                    "> 0")
              for name in ACCURACY[world]]
    drop = ctrl.get("sdpo_s", {})
    return rows, [between("token vs behaviour", "eval/held-out accuracy", ("SDPO c=s from the shipped base",
                          "from the drop_hedge base"), (sdpo, drop), "toy control: drop_hedge loses less", "> 0"),
                  within("token vs behaviour: words", drop, "SDPO c=s on the drop_hedge base", total,
                         "toy control: the words still fall", "< 0"), *forced]


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows])


def report(data: dict, world: str, results: Path) -> str:
    rows, controls = claims(data, world)
    lines = ["# Claims report", "",
             f"Computed by `python make_figures.py --results {results}` from the files under `{results}/` only. "
             "Each row compares two per-seed quantities A → B; Δ = B − A, paired by seed.",
             "Direction reproduces: **yes** = Δ has the paper's sign in every seed, **partly** = only the mean over "
             "seeds has it, **no** = not even the mean, **n/a** = results missing. Values: mean ± population std over "
             "seeds; accuracies are fractions (the paper's are %).", "", f"{world} world: {DEFINITIONS[world]}.", "",
             markdown(rows), "", "## Controls (toy world)", ""]
    if data["controls"] is None:
        lines += [f"The token-vs-behaviour control is absent ({missing_message(results, 'controls')}).", ""]
    lines += [markdown(controls), ""]
    lines += [f"- missing: {missing_message(results, k)}" for k in COMMANDS if k != "controls" and data[k] is None]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = Path(args.results)
        if not results.is_dir():
            raise MissingResults(f"{results} does not exist: run the experiments first, e.g. `{COMMANDS['exp01']}`")
        only = [x.strip() for x in args.only.split(",") if x.strip()] or list(NEEDS)
        unknown = [x for x in only if x not in NEEDS]
        if unknown:
            raise ValueError(f"--only {','.join(unknown)}: choose from {','.join(NEEDS)}")
        data = {name: load(results, name) for name in COMMANDS}
        world = data_world(data)
        if not args.claims:
            for need in dict.fromkeys(n for fig in only for n in NEEDS[fig]):
                if data[need] is None:
                    raise MissingResults(missing_message(results, need))
            build_figures(only, data, world, results / "figures")
        text = report(data, world, results)
        if not args.claims:
            (results / "claims.md").write_text(text)
            print(f"wrote the {', '.join(only)} figures to {results / 'figures'} and {results / 'claims.md'}\n")
        print(text)
    except (MissingResults, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
