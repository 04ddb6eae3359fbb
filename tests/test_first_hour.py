"""Issue 12, a user's first hour: --resume never returns a result computed with other settings;
toy and 8B runs never share a directory; every refusal comes before any model loads (within
REFUSAL_CPU_S of CPU); offline fails fast in one paragraph; Ctrl-C ends with one line and the
command that resumes; no prefix matching of flags; the printed table fits 100 columns;
make_figures plots what it finds."""
import importlib
import importlib.util
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common
from infra import run_dirs, tables
from infra import hub  # noqa: E402
import exp01_offpolicy as e1
import exp02_onpolicy_grpo_sdpo as e2
import make_figures as mf
from test_exp02 import write_paper_parquet
from test_figures import onpolicy_run

ROOT = Path(__file__).resolve().parents[1]
EXP02 = [sys.executable, str(ROOT / "exp02_onpolicy_grpo_sdpo.py")]


REFUSAL_CPU_S = 10  # the imports alone (torch, transformers) took 2-5 s of CPU on these cores


def timed(cmd, env=None, timeout=120):
    """(process, CPU seconds it used). CPU time, not wall time: this machine's 2 cores are shared,
    and under load a refusal that takes 2 s alone can take 10 s of wall clock; loading any model
    costs far more CPU than the REFUSAL_CPU_S bound (and an 8B one cannot load here at all)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def messages(stderr: str) -> list[str]:
    """stderr lines that are not the model loader's progress bars."""
    return [line for line in stderr.splitlines() if line.strip() and "Loading weights" not in line]


def finished_run(run: Path, **settings) -> None:
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"settings": settings}))
    (run / "final.json").write_text(json.dumps({"final": {}}))


# ---- 1. --resume compares the settings of finished runs; toy and 8B never meet ----

def test_resume_of_a_finished_run_with_other_settings_is_refused_before_any_model_loads(tmp_path):
    """An 8B model: had anything been loaded, this would fail offline or take minutes."""
    finished_run(tmp_path / "grpo" / "seed0", steps=2, model="qwen3-8b")
    proc, seconds = timed(EXP02 + ["--model", "qwen3-8b", "--method", "grpo", "--steps", "3", "--resume",
                                   "--out-dir", str(tmp_path)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--steps (run: 2, now: 3)" in proc.stderr and "Traceback" not in proc.stderr
    assert seconds < REFUSAL_CPU_S, f"refused after {seconds:.1f} s"


def test_finished_run_without_resume_and_sweep_only_flags(tmp_path):
    finished_run(tmp_path / "grpo" / "seed0", steps=2, model="qwen3-8b")
    proc, seconds = timed(EXP02 + ["--model", "qwen3-8b", "--method", "grpo", "--out-dir", str(tmp_path)])
    assert proc.returncode == 2 and "holds a finished run" in proc.stderr, proc.stderr[-2000:]
    assert seconds < REFUSAL_CPU_S, seconds
    s = e2.Settings(model="qwen3-8b", steps=2, seeds="0,1", out_dir="elsewhere")  # sweep-only: ignored
    assert run_dirs.check_run(tmp_path / "grpo" / "seed0", s, resume=True, sweep_only=s.SWEEP_ONLY) == "finished"


def test_toy_and_8b_default_directories_differ():
    for script in (e1, e2):
        toy = run_dirs.default_out_dir(script.Settings.out_dir, "toy")
        big = run_dirs.default_out_dir(script.Settings.out_dir, "qwen3-8b")
        assert toy != big and "qwen3-8b" in big and "toy" in toy
    assert run_dirs.default_out_dir("runs/{model}/exp02", "Qwen/Qwen3-8B") == "runs/Qwen_Qwen3-8B/exp02"


# ---- 2. checks before loading: backend, flag combinations, data files ----

@pytest.mark.parametrize("args, message", [
    (["--backend", "vllm"], "--backend vllm needs"),
    (["--backend", "vllm", "--temperature", "0.7"], "temperature 1 and top-p 1 only"),
    (["--train-file", "/nonexistent/train.parquet"], "does not exist"),
    (["--data-dir", "/nonexistent"], "aime24.parquet not found"),
    (["--mini-batches", "3"], "do not split into --mini-batches 3"),
])
def test_refusals_come_before_the_model_loads(tmp_path, args, message):
    if args == ["--backend", "vllm"] and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here (the refusal needs a machine without it)")
    proc, seconds = timed(EXP02 + ["--model", "qwen3-8b", "--out-dir", str(tmp_path / "o")] + args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert seconds < REFUSAL_CPU_S and not (tmp_path / "o").exists(), seconds


# ---- 3. offline: fast, one paragraph, the fix named ----

def test_offline_model_fails_fast_in_one_paragraph(tmp_path):
    write_paper_parquet(tmp_path / "train.parquet", [("What is 1+1?", "2")])
    for name in ("aime24", "amc23"):
        write_paper_parquet(tmp_path / f"{name}.parquet", [("What is 3+3?", "6")])
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # nothing listens; empty cache
    t0 = time.monotonic()
    proc, _ = timed(EXP02 + ["--model", "qwen3-8b", "--method", "grpo", "--train-file",
                             str(tmp_path / "train.parquet"), "--data-dir", str(tmp_path),
                             "--out-dir", str(tmp_path / "o")], env=env)
    seconds = time.monotonic() - t0  # wall clock: the hub client's retries sleep (5 of them, ~48 s)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = messages(proc.stderr)
    assert len(lines) == 1, lines
    for part in ("HF_HUB_OFFLINE=1", "'Qwen/Qwen3-8B'", "--model PATH", "127.0.0.1"):
        assert part in lines[0], part
    assert "Retrying" not in proc.stderr
    assert seconds < 40, seconds


def test_offline_message_keeps_the_whole_underlying_error():
    error = OSError("x" * 500 + " https://huggingface.co/Qwen/Qwen3-8B/resolve/main/config.json")
    text = hub.offline_message("Qwen/Qwen3-8B", "model", error)
    assert "x" * 500 in text and text.count("\n") == 0 and "resolve/main/config.json" in text


# ---- 4. Ctrl-C: one line, the last checkpoint and the command; a resume says where ----

@pytest.mark.slow
def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tmp_path):
    if not (ROOT / "toy_model").exists():
        pytest.skip("toy_model/ is missing")
    args = ["--method", "grpo", "--steps", "8", "--eval-n", "8", "--prompts-per-step", "4", "--rollouts", "4",
            "--eval-every", "8", "--checkpoint-every", "1", "--threads", "1", "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(EXP02 + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    run, deadline = tmp_path / "grpo" / "seed0", time.time() + 300
    while not (run / "checkpoints" / "step_000002").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    lines = messages(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, lines
    step = int(lines[0].split("last checkpoint at step ")[1].split(";")[0])
    assert step >= 2
    command = shlex.split(lines[0].split("continue with: ")[1])
    assert command[-1] == "--resume" and command[1:-1] == EXP02[1:] + args
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {step}" in resumed.stdout
    assert [r["step"] for r in common.read_metrics(run)] == list(range(9))


# ---- 5. flags: no prefix matching, one line naming the closest flag ----

def test_prefix_of_a_flag_is_refused_naming_the_real_one():
    proc, _ = timed(EXP02 + ["--step", "3"])
    assert proc.returncode == 2 and messages(proc.stderr) == [
        "error: unknown flag --step; did you mean --steps? (see --help)"]
    proc, _ = timed(EXP02 + ["--steps", "three"])
    assert proc.returncode == 2 and len(messages(proc.stderr)) == 1 and "--steps" in proc.stderr


# ---- 6. the printed table: <= 100 columns, base first; summary.json holds numbers ----

def fake_finals(world: str, seeds=(0, 1, 2)) -> list[dict]:
    sets = ("in_domain", "ood_d4", "ood_d5", "ood_l5", "train_graphs") if world == "toy" else ("aime24", "amc23")
    k = 1 if world == "toy" else 16

    def row(acc):
        return {"step": 0, "train/reward": 0.5, **{f"eval/{x}/avg@{k}": acc for x in sets},
                **{f"eval/{x}/pass@{k}": 1.0 for x in sets if k > 1},
                **{f"eval/{x}/epistemic/total": 12.345 for x in sets},
                **{f"eval/{x}/response_length": 12345.678 for x in sets}}

    return [{"method": m, "teacher_context": c, "seed": seed, "base": row(0.5), "final": row(0.9 + 0.01 * seed)}
            for seed in seeds for m, c in e2.ARMS]


@pytest.mark.parametrize("world", ["toy", "math"])
def test_the_printed_table_fits_100_columns_and_summary_holds_numbers(world, capsys):
    finals = fake_finals(world)
    tables.print_summary(finals, "runs/x/exp02", importlib.import_module(f"{world}_world"),
                         e2.arm_name)
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 100, out
    assert out.splitlines()[2].startswith("| base (step 0) | 3 |")
    rows = tables.summarize(finals, e2.arm_name)
    assert [r["arm"] for r in rows] == ["base (step 0)", "grpo", "sdpo_s", "sdpo_s_nothink"]
    acc = "eval/in_domain/avg@1" if world == "toy" else "eval/aime24/avg@16"
    assert rows[1][acc] == {"mean": pytest.approx(0.91), "std": pytest.approx(0.0081650, rel=1e-4), "n": 3}
    assert rows[0][acc]["n"] == 3  # the base: one evaluation per seed


def test_exp01_tables_fit_100_columns(capsys):
    base = fake_finals("toy", seeds=(0,))[0]["final"]
    t1 = {c: {"questions": 10, "accuracy": 0.5, "response_length": 123.4, "epistemic/total": 2.0,
              "epistemic/total_per_1k_tokens": 16.2} for c in e1.CONTEXTS}
    finals = [{"table1": t1, "table2": {m: base for m in ("base", "D_ug", "D_sg")}} for _ in range(3)]
    e1.print_summary(finals, "runs/toy/exp01", importlib.import_module("toy_world"))
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 100, out
    assert e1.summarize(finals)["table1"][0]["accuracy"] == {"mean": 0.5, "std": 0.0, "n": 3}


# ---- 7. make_figures --results DIR: whatever it holds, hints never into results/ ----

def test_figures_from_a_tree_holding_only_exp02(tmp_path, capsys):
    runs = tmp_path / "runs" / "toy"
    for arm in ("grpo", "sdpo_s", "sdpo_s_nothink"):
        onpolicy_run(runs / "exp02" / arm / "seed0", 0, dict(acc=-0.1, ood=-0.1, doubt=-1, length=-2, reward=0.1),
                     sdpo=arm != "grpo")
    assert mf.main(["--results", str(runs)]) == 0
    out = capsys.readouterr().out
    assert {p.stem for p in (runs / "figures").glob("*.png")} == {"exp02_onpolicy", "exp02_failures"}
    for name in ("exp01", "exp03", "exp04"):
        assert f"not plotted: {name}" in out and f"--out-dir {runs}/{name}" in out
    assert "results/" not in out.replace(str(tmp_path), "")
    assert mf.main(["--results", str(tmp_path / "runs")]) == 2  # the per-model level is named
    assert f"--results {runs}" in capsys.readouterr().err


def test_hints_for_the_reference_tree_name_the_reproduction_script():
    assert set(mf.commands(mf.REFERENCE).values()) == {"bash reproduce_toy.sh"}
    assert all("results/" not in c for c in mf.commands(Path("runs/toy")).values())
