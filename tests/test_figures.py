"""make_figures.py: the direction rule and the controls' verdict rules on literal inputs, every
figure and the claims report from a small synthetic results tree (2 seeds of every experiment and
control) in a subprocess, and clear failures."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import make_figures as mf

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ["exp01_table1", "exp01_table2", "exp02_onpolicy", "exp03_ema", "exp04_coverage",
           "controls", "exp02_failures", "exp03_failures", "exp04_failures", "controls_failures",
           "exp03_mechanism"]
FAILURES = ["exp02_failures", "exp03_failures", "exp04_failures", "controls_failures"]
TOY_SETS = ("in_domain", "ood_d4", "ood_d5", "ood_l5", "train_graphs")
MATH = {"sets": ("aime24", "amc23"), "k": 16}  # exp02's math evaluation
CLASSES = ("correct", "invalid_edge", "repeated_arm", "misread", "wrong_commit", "cut_at_limit",
           "no_answer")  # toy_world.FAILURE_CLASSES
TOKENS = {"maybe": (0.10, 0.45), "wait": (0.05, 0.02), "branch": (0.10, 0.35),  # toy TOKEN_TYPES:
          "arm": (0.35, 0.02), "answer": (0.20, 0.02), "other": (0.20, 0.14)}  # (share, grad)
SHIPPED = dict(acc=-0.4, ood=-0.3, doubt=-1.8, length=-8.0, reward=0.2)  # SDPO c=s, shipped base


# ---------------------------------------------------------------------------------------------
# A synthetic results tree in the experiments' layout, where every claim holds in every seed
# ---------------------------------------------------------------------------------------------
def eval_metrics(prefix: str, acc: float, ood: float, doubt: float, length: float, sets=TOY_SETS,
                 k=1) -> dict:
    """Flat evaluation metrics: accuracy `acc` on in_domain and train_graphs, `ood` on any other
    set; `doubt` `wait`s and `maybe`s per response, the other words zero."""
    m = {}
    for s in sets:
        m[f"{prefix}{s}/avg@{k}"] = acc if s in ("in_domain", "train_graphs") else ood
        m[f"{prefix}{s}/response_length"] = length
        m.update({f"{prefix}{s}/epistemic/{w}": doubt if w in ("wait", "maybe") else 0.0
                  for w in mf.WORDS})
        m[f"{prefix}{s}/epistemic/total"] = 2 * doubt
    return m


def mechanism_metrics(acc: float, ood: float, filler: float, sets=TOY_SETS) -> dict:
    """The failure classes of an evaluation (the wrong share: 60 % repeated_arm, 40 %
    invalid_edge, so repeated_arm grows most as accuracy falls) and `the` per response."""
    m = {}
    for s in sets:
        right = acc if s in ("in_domain", "train_graphs") else ood
        shares = {"correct": right, "repeated_arm": 0.6 * (1 - right),
                  "invalid_edge": 0.4 * (1 - right)}
        m.update({f"eval/{s}/failure/{c}": shares.get(c, 0.0) for c in CLASSES})
        m[f"eval/{s}/words/the"] = filler
    return m


def token_metrics(sdpo: bool, f: float) -> dict:
    """A training row's token-type shares (f: the fraction of training done)."""
    m = {}
    for t, (share, grad) in TOKENS.items():
        m.update({f"train/tokens/{t}/share": share, f"train/tokens/{t}/grad_share": grad})
        if sdpo:
            m.update({f"train/sdpo/tokens/{t}/divergence": grad * (1 - f / 2),
                      f"train/sdpo/tokens/{t}/divergence_share": grad})
    return m


def write_run(run: Path, rows: list[dict], final: dict, cut_last_line: bool = False) -> None:
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"settings": {"seed": final.get("seed", 0)}}))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run / "metrics.jsonl").write_text(text + ('{"step": 99, "train/rew' if cut_last_line else ""))
    (run / "final.json").write_text(json.dumps(final))
    (run / "samples" / "eval_in_domain.jsonl").write_text('{"response": "x"}\n')


def onpolicy_run(run: Path, seed: int, change: dict, steps: int = 4, sdpo: bool = True,
                 cut: bool = False, world: dict | None = None, filler=(0.0, 0.0)) -> None:
    """Step 0 = the base's evaluation; steps 1..N train rows moving linearly by `change` (acc,
    ood, doubt, length, reward), with evaluations at steps 2 and N; `the` per response moves
    from filler[0] to filler[1]."""
    noise, world = 0.01 * seed, world or {}
    sets = world.get("sets", TOY_SETS)
    rows = []
    for step in range(steps + 1):
        f, g = max(step - 1, 0) / (steps - 1), step / steps
        row = {"step": step}
        if step:
            row.update({"train/reward": 0.7 + f * change["reward"] + noise,
                        "train/response_length": 20.0 + f * change["length"], "train/loss": 0.1,
                        "train/entropy": 1.0, "train/grad_norm": 0.5, "train/lr": 1e-4,
                        "train/demo_fraction": 0.8 if sdpo else 0.0,
                        **{f"train/epistemic/{w}": 2.0 + f * change["doubt"]
                           for w in ("wait", "maybe")},
                        "train/epistemic/total": 4.0 + 2 * f * change["doubt"],
                        "train/epistemic_word/total": 4.0, **token_metrics(sdpo, f)})
        if step and sdpo:
            row.update({"train/sdpo/divergence_epistemic": 0.5 - 0.1 * f,
                        "train/sdpo/divergence_other": 0.1})
        if step in (0, 2, steps):
            acc, ood = 0.9 + noise + g * change["acc"], 0.8 + g * change["ood"]
            row.update(eval_metrics("eval/", acc, ood, 2.0 + g * change["doubt"],
                                    20.0 + g * change["length"], **world))
            row.update(mechanism_metrics(acc, ood, filler[0] + g * (filler[1] - filler[0]), sets))
            row.update({"eval/problems_per_set": 200 if step in (0, steps) else 50,
                        "probe/maybe/student": 0.6 - 0.4 * g,
                        **({"probe/maybe/teacher": 0.01} if sdpo else {})})
        rows.append(row)
    final = {"method": "sdpo" if sdpo else "grpo", "teacher_context": "s" if sdpo else None,
             "seed": seed, "steps": steps, "settings": {}, "base": rows[0], "final": rows[-1],
             "train_time_s": 1.0}
    write_run(run, rows, final, cut_last_line=cut)


def context_metrics(acc: float, length: float, doubt: float) -> dict:
    return {"questions": 10, "accuracy": acc, "response_length": length,
            **{f"epistemic/{w}": doubt if w in ("wait", "maybe") else 0.0 for w in mf.WORDS},
            "epistemic/total": 2 * doubt, "epistemic/total_per_1k_tokens": 2000 * doubt / length,
            "epistemic_word/total": 2 * doubt}


def model_metrics(acc: float, ood: float, doubt: float, forced_gain: float, sft: bool) -> dict:
    m = {**eval_metrics("eval/", acc, ood, doubt, 20.0),
         **eval_metrics("eval_forced/", acc + forced_gain, ood + forced_gain, doubt + 1, 24.0,
                        TOY_SETS[:4])}
    return dict(m, **({"sft/examples": 90, "sft/steps": 56, "sft/tokens": 9000} if sft else {}))


def synthetic_results(root: Path, seeds=(0, 1)) -> Path:
    sdpo, grpo = SHIPPED, dict(acc=0.02, ood=0.01, doubt=0.5, length=2.0, reward=0.1)
    scaled = lambda scale: {k: v * scale for k, v in sdpo.items()}  # noqa: E731
    for seed in seeds:
        n = 0.01 * seed
        table1 = {"none": context_metrics(0.5 + n, 20.0, 3.0),
                  "s": context_metrics(0.98, 8.0, 0.1 + n),
                  "s_nothink": context_metrics(0.8, 10.0, 1.0),
                  "regenerated": context_metrics(0.95, 9.0, 0.3)}
        table2 = {"base": model_metrics(0.9, 0.85 + n, 2.0, 0.0, False),
                  "D_ug": model_metrics(0.92, 0.84, 2.0, 0.0, True),
                  "D_sg": model_metrics(0.4, 0.35 + n, 0.0, 0.2, True)}  # forcing helps a bit
        write_run(root / "exp01" / f"seed{seed}", [{"step": 1, "sft/D_ug/loss": 1.0}],
                  {"seed": seed, "world": "toy", "table1": table1, "table2": table2})
        exp02 = root / "exp02"
        onpolicy_run(exp02 / "grpo" / f"seed{seed}", seed, grpo, sdpo=False)
        onpolicy_run(exp02 / "sdpo_s" / f"seed{seed}", seed, sdpo, cut=seed == 0)
        onpolicy_run(exp02 / "sdpo_s_nothink" / f"seed{seed}", seed, dict(sdpo, doubt=-0.5))
        for tau, scale in (("ema0", 0.5), ("ema0.01", 0.7), ("ema0.05", 1.0), ("ema0.2", 1.2)):
            onpolicy_run(root / "exp03" / tau / f"seed{seed}", seed, scaled(scale))
        for cov, scale in (("cov1", 0.2), ("cov8", 0.5), ("fresh", 1.0)):
            onpolicy_run(root / "exp04" / cov / "grpo" / f"seed{seed}", seed,
                         dict(acc=0.0, ood=0.01, doubt=0.2, length=1.0, reward=0.1), sdpo=False)
            onpolicy_run(root / "exp04" / cov / "sdpo_s" / f"seed{seed}", seed, scaled(scale))
        controls = {"drop_hedge": (dict(sdpo, acc=-0.1), (0.0, 0.0)),
                    "wrong_revised": (dict(sdpo, ood=-0.05), (0.0, 0.0)),  # for construction
                    "filler": (dict(sdpo), (2.0, 0.2 + 10 * n))}  # removed, no extra cost
        for name, (change, filler) in controls.items():
            run = root / "controls" / name / "exp02" / "sdpo_s" / f"seed{seed}"
            onpolicy_run(run, seed, change, filler=filler)
    (root / "exp01" / "summary.json").write_text("{}")
    return root


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "make_figures.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def report_rows(text: str) -> dict[str, str]:
    """first cell -> the judging cell (`direction reproduces` or `verdict`), from the markdown
    tables of the report."""
    rows, judge = {}, None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|---"):
            continue
        if not line.startswith("| "):
            judge = None
        elif judge is None:  # a header
            judge = next((cells.index(c) for c in ("direction reproduces", "verdict")
                          if c in cells), -1)
        elif judge >= 0:
            rows[cells[0]] = cells[judge]
    return rows


def report_cells(text: str, first: str) -> dict[str, str]:
    """The row of a report table whose first cell is `first`, as {column: cell}."""
    header = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|---"):
            continue
        if not line.startswith("| "):
            header = None
        elif header is None:
            header = cells
        elif cells[0] == first:
            return dict(zip(header, cells))
    raise KeyError(first)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
def test_direction_rule_on_literal_inputs():
    assert mf.direction({0: -1.0, 1: -0.5, 2: -2.0}, "< 0") == "yes"  # every seed has the sign
    assert mf.direction({0: -3.0, 1: 0.5}, "< 0") == "partly"  # the mean has it, seed 1 does not
    assert mf.direction({0: 1.0, 1: -0.5}, "< 0") == "no"  # not even the mean
    assert mf.direction({0: 0.0, 1: 0.0}, "> 0") == "no"  # no change is not an increase ...
    assert mf.direction({0: 0.0, 1: 0.1}, "≥ 0") == "yes"  # ... but it keeps ("keeps or improves")
    assert mf.direction({}, "> 0") == "n/a"


def test_pairing_is_by_seed_and_claims_use_it():
    assert mf.paired({0: 1.0, 1: 2.0, 2: 5.0}, {0: 0.0, 1: 3.0, 3: 9.0}) == {0: -1.0, 1: 1.0}
    row = mf.claim("X", "a → b", "p", {0: 1.0, 1: 1.0, 2: 1.0}, {0: 0.0, 1: 1.5}, "< 0")
    assert row["direction reproduces"] == "partly"
    assert "n = 2" in row["ours (mean ± std over seeds)"]
    assert mf.mean_std([1.0, 3.0]) == "2.000 ± 1.000" and mf.mean_std([]) == "n/a"


def test_control_verdicts_follow_the_prestated_criteria():
    ship = {0: -0.30, 1: -0.30}  # Δ_ship: |Δ_ship|/3 = 0.10, 2|Δ_ship|/3 = 0.20
    construction = lambda *ctrl: mf.construction_verdict(ship, dict(enumerate(ctrl)))  # noqa
    assert construction(-0.05, -0.10) == "for construction"  # |Δ_ctrl| = 0.075 ≤ 0.10
    assert construction(-0.25, -0.20) == "against construction"  # 0.225 ≥ 0.20, every seed < 0
    assert construction(-0.30, 0.05) == "inconclusive"  # 0.125: between the two bounds
    assert construction(-0.50, 0.02) == "inconclusive"  # 0.24 ≥ 0.20, but seed 1 rose
    assert construction() == "n/a"
    base = {0: 2.0, 1: 2.0}
    assert mf.removal_verdict(base, {0: 0.5, 1: 1.0}) == "removed"  # falls 75 %, 50 %
    assert mf.removal_verdict(base, {0: 1.8, 1: 1.9}) == "kept"  # 10 %, 5 %: mean < 20 %
    assert mf.removal_verdict(base, {0: 0.5, 1: 1.5}) == "partly"  # 75 %, 25 %
    assert mf.removal_verdict({0: 0.0}, {0: 0.0}) == "n/a"  # no filler at the base
    assert mf.cost_verdict(ship, {0: -0.34, 1: -0.32}) == "no extra cost"  # gap −0.03
    assert mf.cost_verdict(ship, {0: -0.40, 1: -0.38}) == "costs more"  # gap −0.09
    assert mf.cost_verdict(ship, {0: -0.20, 1: -0.22}) == "costs less"  # gap +0.09


def test_metrics_reader_ignores_only_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n{"step": 2, "a"')
    assert mf.read_metrics(tmp_path)["a"].tolist() == [1, 2]
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a"\n{"step": 2, "a": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        mf.read_metrics(tmp_path)


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The synthetic tree (2 seeds of everything) and the script's run on it, made once."""
    results = synthetic_results(tmp_path_factory.mktemp("tree") / "results")
    return results, run_script("--results", results)


def test_every_figure_and_the_claims_report_from_a_synthetic_tree(full_tree):
    results, proc = full_tree
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = results / "figures"
    for name in FIGURES:
        for ext in ("png", "csv"):
            path = figures / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 0, path
        frame = pd.read_csv(figures / f"{name}.csv", comment="#")
        assert list(frame.columns) == ["panel", "series", "x", "mean", "std", "n"]
        assert (frame.n == 2).all(), name
    assert "OOD accuracy = mean avg@1 over ood_d4" in (figures / "exp02_onpolicy.csv").read_text()
    table1 = pd.read_csv(figures / "table1.csv")
    assert table1["accuracy mean"].tolist() == pytest.approx([0.505, 0.98, 0.8, 0.95])
    table2 = pd.read_csv(figures / "table2.csv")
    assert table2.model.tolist() == ["base", "D_ug", "D_sg"]
    assert "eval_forced/ood_d4/avg@1 mean" in table2
    text = (results / "claims.md").read_text()
    assert text in proc.stdout
    rows = report_rows(text)
    for c in ("C1", "C2", "C3", "C4", "C5"):
        assert any(name.startswith(c) for name in rows), c
    # the synthetic tree reproduces every claim in both seeds: anything else is a sign error
    verdicts = {"wrong_revised": "for construction", "filler: removal": "removed",
                "filler: cost": "no extra cost"}
    assert {name: d for name, d in rows.items() if d != "yes"} == verdicts
    assert "0.505 ± 0.005 → 0.980 ± 0.000 (Δ +0.475 ± 0.005, n = 2)" in text  # C1 accuracy


def test_failure_classes_sum_to_one_and_the_report_names_what_grew(full_tree):
    results, _ = full_tree
    for name in FAILURES:
        frame = pd.read_csv(results / "figures" / f"{name}.csv", comment="#")
        assert set(frame.series) == set(CLASSES), name
        sums = frame.groupby(["panel", "x"])["mean"].sum()
        assert sums.to_numpy() == pytest.approx(1.0), name  # per step and arm
    panels = set(pd.read_csv(results / "figures" / "controls_failures.csv", comment="#").panel)
    assert panels == {f"{b} base: failure classes on ood_d5"
                      for b in ("shipped", "drop_hedge", "wrong_revised", "filler")}
    text, column = (results / "claims.md").read_text(), "failure classes grown most (base → final)"
    # SDPO c=s: OOD 0.8 → 0.5 on ood_d5; of the wrong answers 60 % repeated_arm, 40 % invalid_edge
    grown = "repeated_arm 0.12 → 0.30, invalid_edge 0.08 → 0.20"
    for c in ("C3 epistemic", "C3 length", "C3 OOD accuracy"):
        assert report_cells(text, c)[column] == f"ood_d5: {grown}", c
    both = f"ood_d5: GRPO: none grew; SDPO c=s: {grown}"  # GRPO: OOD 0.80 → 0.81
    assert report_cells(text, "C3 epistemic vs GRPO")[column] == both
    assert report_cells(text, "C1 accuracy")[column] == "—"  # exp01 logs no failure classes
    grpo = report_cells(text, "exp02")  # the failure table's first exp02 row
    assert grpo["arm"] == "grpo" and grpo["correct"] == "0.80 ± 0.00 → 0.81 ± 0.00"
    assert grpo["grown most"] == "none grew"
    assert "| exp02 | sdpo_s | 2 | 0.80 ± 0.00 → 0.50 ± 0.00 | 0.08 ± 0.00 → 0.20 ± 0.00 |" in text


def test_mechanism_figure_reads_the_token_types_and_the_probe(full_tree):
    results, _ = full_tree
    frame = pd.read_csv(results / "figures" / "exp03_mechanism.csv", comment="#")
    divergence = frame[frame.panel.str.startswith("divergence share")]
    assert set(divergence.series) == {"ema0", "ema0.01", "ema0.05", "ema0.2"}
    assert list(dict.fromkeys(divergence.x)) == list(TOKENS)
    assert divergence[divergence.x == "maybe"]["mean"].to_numpy() == pytest.approx(0.45)
    exp02 = frame[frame.panel == "gradient share per token type (exp02, mean over steps)"]
    assert set(exp02.series) == {"grpo", "sdpo_s", "sdpo_s_nothink"}
    probe = frame[frame.series == "ema0 · student"]
    assert probe.x.tolist() == ["0", "2", "4"] and probe["mean"].tolist() == pytest.approx(
        [0.6, 0.4, 0.2])
    assert (frame[frame.series == "ema0 · teacher"]["mean"] == 0.01).all()


def test_controls_section_judges_each_control_by_its_criteria(full_tree):
    results, _ = full_tree
    text = (results / "claims.md").read_text()
    assert "fixed before the wrong_revised and filler runs" in text
    assert "|Δ_ctrl| ≤ 1/3·|Δ_ship|" in text and "by ≥ 50% in every seed" in text
    ours = lambda row: report_cells(text, row)["ours (mean ± std over seeds)"]  # noqa: E731
    wrong = ours("wrong_revised")  # Δ_ctrl −0.05 vs Δ_ship −0.30: for construction
    assert "Δ_ship -0.300 ± 0.000, Δ_ctrl -0.050 ± 0.000 (n = 2)" in wrong
    assert "Δ `maybe` per response on in_domain -1.800 ± 0.000" in wrong
    assert "ood_d5: repeated_arm 0.12 → 0.15" in wrong
    assert "fall per seed: 90%, 85%" in ours("filler: removal")
    assert "Δ_ctrl − Δ_ship +0.000 ± 0.000" in ours("filler: cost")
    column = "failure classes grown most (base → final)"
    drop = report_cells(text, "token vs behaviour: words")[column]  # drop_hedge's classes
    assert drop == "ood_d5: repeated_arm 0.12 → 0.30, invalid_edge 0.08 → 0.20"


def test_missing_experiment_or_control_is_named_with_its_command(tmp_path):
    results = synthetic_results(tmp_path / "results", seeds=(0,))
    shutil.rmtree(results / "exp02")
    shutil.rmtree(results / "controls" / "filler")
    proc = run_script("--results", results)  # the others are plotted, exp02 and filler named
    assert proc.returncode == 0, proc.stderr
    assert "not plotted: exp02" in proc.stdout and "exp02_onpolicy_grpo_sdpo.py" in proc.stdout
    command = (f"python toy_world.py control filler {results}/controls/filler/model && python "
               f"exp02_onpolicy_grpo_sdpo.py --model {results}/controls/filler/model --method "
               f"sdpo --teacher-context s --seeds 0,1,2 --out-dir {results}/controls/filler/exp02")
    assert f"not plotted: control filler: {results}/controls/filler/exp02 is missing" in proc.stdout
    text = (results / "claims.md").read_text()
    assert f"- missing control filler: {results}/controls/filler/exp02 is missing" in text
    assert f"`{command}`" in text
    assert report_rows(text)["filler: removal"] == "n/a"
    assert "control missing (command below)" in report_cells(text, "filler: cost").values()
    proc = run_script("--results", results, "--only", "exp02")  # asked for: an error
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "exp02_onpolicy_grpo_sdpo.py" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_math_world_is_detected_from_the_set_names(tmp_path, capsys):
    results = tmp_path / "results"
    sets = {"sets": ("aime24", "aime25", "amc23", "math500"), "k": 16}
    for seed in (0, 1):
        table2 = {"base": eval_metrics("eval/", 0, 0.55, 80.0, 13000.0, **sets),
                  "D_ug": eval_metrics("eval/", 0, 0.51 + 0.01 * seed, 70.0, 12000.0, **sets),
                  "D_sg": eval_metrics("eval/", 0, 0.20, 5.0, 3000.0, **sets)}
        table1 = {c: context_metrics(0.5, 13000.0, 90.0) for c in ("none", "s", "s_nothink")}
        table1["regenerated"] = {"questions": 0}  # a context with no question has only this key
        final = {"seed": seed, "world": "math", "table1": table1, "table2": table2}
        write_run(results / "exp01" / f"seed{seed}", [], final)
        for arm, ood in (("grpo", 0.01), ("sdpo_s", -0.2), ("sdpo_s_nothink", -0.1)):
            change = dict(acc=0.0, ood=ood, doubt=-1.0, length=-5000.0, reward=0.1)
            onpolicy_run(results / "exp02" / arm / f"seed{seed}", seed, change,
                         sdpo=arm != "grpo", world=MATH)
    assert mf.main(["--results", str(results), "--only", "exp01,exp02"]) == 0
    out = capsys.readouterr().out
    assert "OOD accuracy = aime24 avg@16" in out
    rows = report_rows(out)
    assert rows["C2 D_sg degrades"] == "yes" and rows["C3 OOD accuracy"] == "yes"
    assert rows["C1 regenerated"] == "n/a"
    curves = pd.read_csv(results / "figures" / "exp02_onpolicy.csv", comment="#")
    assert "sdpo_s · AMC23 accuracy" in set(curves.series)
    assert "eval/aime24/avg@16 mean" in pd.read_csv(results / "figures" / "table2.csv")
    failures = pd.read_csv(results / "figures" / "exp02_failures.csv", comment="#")
    assert set(failures.panel) == {f"{arm}: failure classes on aime24"
                                   for arm in ("grpo", "sdpo_s", "sdpo_s_nothink")}


def test_subsets_claims_only_and_absent_controls(tmp_path, capsys):
    results = synthetic_results(tmp_path / "results", seeds=(0,))
    shutil.rmtree(results / "exp02")
    shutil.rmtree(results / "controls")
    assert mf.main(["--results", str(results), "--only", "exp01,exp04"]) == 0  # exp02 not needed
    assert {p.stem for p in (results / "figures").glob("*.png")} == {
        "exp01_table1", "exp01_table2", "exp04_coverage", "exp04_failures"}
    out = capsys.readouterr().out
    assert "controls/drop_hedge/exp02 is missing" in out
    assert report_rows(out)["C3 OOD accuracy"] == "n/a"
    (results / "claims.md").unlink()
    assert mf.main(["--results", str(results), "--claims"]) == 0
    assert "# Claims report" in capsys.readouterr().out and not (results / "claims.md").exists()
    assert mf.main(["--results", str(results), "--only", "exp9"]) == 2
    assert "--only exp9" in capsys.readouterr().err


def test_script_imports_neither_torch_nor_common():
    code = "import sys, make_figures; assert not {'torch', 'common'} & set(sys.modules), 'heavy'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
