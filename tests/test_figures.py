"""make_figures.py: the direction rule on literal inputs, every figure and the claims report from a
small synthetic results tree (2 seeds of every experiment) in a subprocess, and clear failures."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import make_figures as mf

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ["exp01_table1", "exp01_table2", "exp02_onpolicy", "exp03_ema", "exp04_coverage", "controls"]
TOY_SETS = ("in_domain", "ood_d4", "ood_d5", "ood_l5", "train_graphs")
MATH = {"sets": ("aime24", "amc23"), "k": 16}  # exp02's math evaluation


# ---------------------------------------------------------------------------------------------
# A synthetic results tree in the experiments' layout, where every claim holds in every seed
# ---------------------------------------------------------------------------------------------
def eval_metrics(prefix: str, acc: float, ood: float, doubt: float, length: float, sets=TOY_SETS, k=1) -> dict:
    """Flat evaluation metrics: accuracy `acc` on in_domain and train_graphs, `ood` on any other set;
    `doubt` `wait`s and `maybe`s per response, the other words zero."""
    m = {}
    for s in sets:
        m[f"{prefix}{s}/avg@{k}"] = acc if s in ("in_domain", "train_graphs") else ood
        m[f"{prefix}{s}/response_length"] = length
        m.update({f"{prefix}{s}/epistemic/{w}": doubt if w in ("wait", "maybe") else 0.0 for w in mf.WORDS})
        m[f"{prefix}{s}/epistemic/total"] = 2 * doubt
    return m


def write_run(run: Path, rows: list[dict], final: dict, cut_last_line: bool = False) -> None:
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"settings": {"seed": final.get("seed", 0)}}))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run / "metrics.jsonl").write_text(text + ('{"step": 99, "train/rew' if cut_last_line else ""))
    (run / "final.json").write_text(json.dumps(final))
    (run / "samples" / "eval_in_domain.jsonl").write_text('{"response": "x"}\n')


def onpolicy_run(run: Path, seed: int, change: dict, steps: int = 4, sdpo: bool = True, cut: bool = False,
                 world: dict | None = None) -> None:
    """Step 0 = the base's evaluation; steps 1..N train rows moving linearly by `change` (acc, ood,
    doubt, length, reward), with evaluations at steps 2 and N."""
    noise, world = 0.01 * seed, world or {}
    rows = [{"step": 0, **eval_metrics("eval/", 0.9 + noise, 0.8, 2.0, 20.0, **world)}]
    for step in range(1, steps + 1):
        f = (step - 1) / (steps - 1)
        row = {"step": step, "train/reward": 0.7 + f * change["reward"] + noise,
               "train/response_length": 20.0 + f * change["length"], "train/loss": 0.1, "train/entropy": 1.0,
               "train/grad_norm": 0.5, "train/lr": 1e-4, "train/demo_fraction": 0.8 if sdpo else 0.0,
               **{f"train/epistemic/{w}": 2.0 + f * change["doubt"] for w in ("wait", "maybe")},
               "train/epistemic/total": 4.0 + 2 * f * change["doubt"], "train/epistemic_word/total": 4.0}
        if sdpo:
            row.update({"train/sdpo/divergence_epistemic": 0.5 - 0.1 * f, "train/sdpo/divergence_other": 0.1})
        if step in (2, steps):
            g = step / steps
            row.update(eval_metrics("eval/", 0.9 + noise + g * change["acc"], 0.8 + g * change["ood"],
                                    2.0 + g * change["doubt"], 20.0 + g * change["length"], **world))
        rows.append(row)
    final = {"method": "sdpo" if sdpo else "grpo", "teacher_context": "s" if sdpo else None, "seed": seed,
             "steps": steps, "settings": {}, "base": rows[0], "final": rows[-1], "train_time_s": 1.0}
    write_run(run, rows, final, cut_last_line=cut)


def context_metrics(acc: float, length: float, doubt: float) -> dict:
    return {"questions": 10, "accuracy": acc, "response_length": length,
            **{f"epistemic/{w}": doubt if w in ("wait", "maybe") else 0.0 for w in mf.WORDS},
            "epistemic/total": 2 * doubt, "epistemic/total_per_1k_tokens": 2000 * doubt / length,
            "epistemic_word/total": 2 * doubt}


def model_metrics(acc: float, ood: float, doubt: float, forced_gain: float, sft: bool) -> dict:
    m = {**eval_metrics("eval/", acc, ood, doubt, 20.0),
         **eval_metrics("eval_forced/", acc + forced_gain, ood + forced_gain, doubt + 1, 24.0, TOY_SETS[:4])}
    return dict(m, **({"sft/examples": 90, "sft/steps": 56, "sft/tokens": 9000} if sft else {}))


def synthetic_results(root: Path, seeds=(0, 1)) -> Path:
    sdpo = dict(acc=-0.4, ood=-0.3, doubt=-1.8, length=-8.0, reward=0.2)
    for seed in seeds:
        n = 0.01 * seed
        table1 = {"none": context_metrics(0.5 + n, 20.0, 3.0), "s": context_metrics(0.98, 8.0, 0.1 + n),
                  "s_nothink": context_metrics(0.8, 10.0, 1.0), "regenerated": context_metrics(0.95, 9.0, 0.3)}
        table2 = {"base": model_metrics(0.9, 0.85 + n, 2.0, 0.0, False),
                  "D_ug": model_metrics(0.92, 0.84, 2.0, 0.0, True),
                  "D_sg": model_metrics(0.4, 0.35 + n, 0.0, 0.2, True)}  # forcing brings some accuracy back
        write_run(root / "exp01" / f"seed{seed}", [{"step": 1, "sft/D_ug/loss": 1.0}],
                  {"seed": seed, "world": "toy", "table1": table1, "table2": table2})
        onpolicy_run(root / "exp02" / "grpo" / f"seed{seed}", seed, dict(acc=0.02, ood=0.01, doubt=0.5, length=2.0,
                                                                          reward=0.1), sdpo=False)
        onpolicy_run(root / "exp02" / "sdpo_s" / f"seed{seed}", seed, sdpo, cut=seed == 0)
        onpolicy_run(root / "exp02" / "sdpo_s_nothink" / f"seed{seed}", seed, dict(sdpo, doubt=-0.5))
        for tau, scale in (("ema0", 0.5), ("ema0.01", 0.7), ("ema0.05", 1.0), ("ema0.2", 1.2)):
            onpolicy_run(root / "exp03" / tau / f"seed{seed}", seed, {k: v * scale for k, v in sdpo.items()})
        for cov, scale in (("cov1", 0.2), ("cov8", 0.5), ("fresh", 1.0)):
            onpolicy_run(root / "exp04" / cov / "grpo" / f"seed{seed}", seed, dict(acc=0.0, ood=0.01, doubt=0.2,
                                                                                    length=1.0, reward=0.1), sdpo=False)
            onpolicy_run(root / "exp04" / cov / "sdpo_s" / f"seed{seed}", seed, {k: v * scale for k, v in sdpo.items()})
        onpolicy_run(root / "controls" / "drop_hedge" / "exp02" / "sdpo_s" / f"seed{seed}", seed, dict(sdpo, acc=-0.1))
    (root / "exp01" / "summary.json").write_text("{}")
    return root


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "make_figures.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def report_rows(text: str) -> dict[str, str]:
    """claim -> direction, from the markdown tables of the report."""
    return {cells[0]: cells[-1] for line in text.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split(" | ")]] if cells[0] != "claim"}


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
def test_direction_rule_on_literal_inputs():
    assert mf.direction({0: -1.0, 1: -0.5, 2: -2.0}, "< 0") == "yes"  # every seed has the paper's sign
    assert mf.direction({0: -3.0, 1: 0.5}, "< 0") == "partly"  # the mean has it, seed 1 does not
    assert mf.direction({0: 1.0, 1: -0.5}, "< 0") == "no"  # not even the mean
    assert mf.direction({0: 0.0, 1: 0.0}, "> 0") == "no"  # no change is not an increase ...
    assert mf.direction({0: 0.0, 1: 0.1}, "≥ 0") == "yes"  # ... but it keeps ("keeps or improves")
    assert mf.direction({}, "> 0") == "n/a"


def test_pairing_is_by_seed_and_claims_use_it():
    assert mf.paired({0: 1.0, 1: 2.0, 2: 5.0}, {0: 0.0, 1: 3.0, 3: 9.0}) == {0: -1.0, 1: 1.0}
    row = mf.claim("X", "a → b", "p", {0: 1.0, 1: 1.0, 2: 1.0}, {0: 0.0, 1: 1.5}, "< 0")
    assert row["direction reproduces"] == "partly" and "n = 2" in row["ours (mean ± std over seeds)"]
    assert mf.mean_std([1.0, 3.0]) == "2.000 ± 1.000" and mf.mean_std([]) == "n/a"


def test_metrics_reader_ignores_only_a_cut_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n{"step": 2, "a"')
    assert mf.read_metrics(tmp_path)["a"].tolist() == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "a": 1}\n{"step": 1, "a"\n{"step": 2, "a": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        mf.read_metrics(tmp_path)


def test_every_figure_and_the_claims_report_from_a_synthetic_tree(tmp_path):
    results = synthetic_results(tmp_path / "results")
    proc = run_script("--results", results)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in FIGURES:
        for ext in ("png", "csv"):
            path = results / "figures" / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 0, path
        frame = pd.read_csv(results / "figures" / f"{name}.csv", comment="#")
        assert list(frame.columns) == ["panel", "series", "x", "mean", "std", "n"] and (frame.n == 2).all()
    assert "OOD accuracy = mean avg@1 over ood_d4" in (results / "figures" / "exp02_onpolicy.csv").read_text()
    table1 = pd.read_csv(results / "figures" / "table1.csv")
    assert table1["accuracy mean"].tolist() == pytest.approx([0.505, 0.98, 0.8, 0.95])
    table2 = pd.read_csv(results / "figures" / "table2.csv")
    assert table2.model.tolist() == ["base", "D_ug", "D_sg"] and "eval_forced/ood_d4/avg@1 mean" in table2
    text = (results / "claims.md").read_text()
    assert text in proc.stdout
    rows = report_rows(text)
    for c in ("C1", "C2", "C3", "C4", "C5"):
        assert any(name.startswith(c) for name in rows), c
    # the synthetic tree reproduces every claim in both seeds: anything else is a sign error
    assert {name: d for name, d in rows.items() if d != "yes"} == {}
    assert "0.505 ± 0.005 → 0.980 ± 0.000 (Δ +0.475 ± 0.005, n = 2)" in text  # C1 accuracy, computed


def test_missing_experiment_is_named_with_its_command(tmp_path):
    results = synthetic_results(tmp_path / "results", seeds=(0,))
    shutil.rmtree(results / "exp02")
    proc = run_script("--results", results)  # the others are plotted, exp02 is named
    assert proc.returncode == 0, proc.stderr
    assert "not plotted: exp02" in proc.stdout and "exp02_onpolicy_grpo_sdpo.py" in proc.stdout
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
            onpolicy_run(results / "exp02" / arm / f"seed{seed}", seed, change, sdpo=arm != "grpo", world=MATH)
    assert mf.main(["--results", str(results), "--only", "exp01,exp02"]) == 0
    out = capsys.readouterr().out
    assert "OOD accuracy = aime24 avg@16" in out
    rows = report_rows(out)
    assert rows["C2 D_sg degrades"] == "yes" and rows["C3 OOD accuracy"] == "yes" and rows["C1 regenerated"] == "n/a"
    curves = pd.read_csv(results / "figures" / "exp02_onpolicy.csv", comment="#")
    assert "sdpo_s · AMC23 accuracy" in set(curves.series)
    assert "eval/aime24/avg@16 mean" in pd.read_csv(results / "figures" / "table2.csv")


def test_subsets_claims_only_and_absent_controls(tmp_path, capsys):
    results = synthetic_results(tmp_path / "results", seeds=(0,))
    shutil.rmtree(results / "exp02")
    shutil.rmtree(results / "controls")
    assert mf.main(["--results", str(results), "--only", "exp01,exp04"]) == 0  # exp02 not needed
    assert {p.stem for p in (results / "figures").glob("*.png")} == {"exp01_table1", "exp01_table2", "exp04_coverage"}
    out = capsys.readouterr().out
    assert "controls/drop_hedge/exp02 is missing" in out and report_rows(out)["C3 OOD accuracy"] == "n/a"
    (results / "claims.md").unlink()
    assert mf.main(["--results", str(results), "--claims"]) == 0
    assert "# Claims report" in capsys.readouterr().out and not (results / "claims.md").exists()
    assert mf.main(["--results", str(results), "--only", "exp9"]) == 2
    assert "--only exp9" in capsys.readouterr().err


def test_script_imports_neither_torch_nor_common():
    code = "import sys, make_figures; assert not {'torch', 'common'} & set(sys.modules), 'heavy import'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
