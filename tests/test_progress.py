"""Progress you can see, exact regeneration: bars on a terminal and plain lines in a log
(infra/progress.py), --wandb mirroring metrics.jsonl (infra/tracking.py, with a fake `wandb`
module: the real one is not a dependency), and recheck.py re-running a run to the same
final.json."""
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import common
import exp02_onpolicy_grpo_sdpo as e2
import exp03_ema_teacher as e3
import exp04_coverage as e4
import recheck
from infra import parallel, progress, run_dirs
from infra.hub import SetupError

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--method", "grpo", "--steps", "2", "--eval-n", "8", "--prompts-per-step", "4",
       "--rollouts", "4", "--threads", "1"]
ARMS = ("grpo", "sdpo_s", "sdpo_s_nothink")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def needs_toy_model():
    if not (ROOT / "toy_model" / "model.safetensors").exists():
        pytest.skip("toy_model/ is missing")


# ---- progress: exactly one of bar (terminal) and lines (log) ----

def test_in_a_log_no_bar_is_drawn_and_the_step_line_is_printed(capsys):
    steps = progress.bar(range(2), "grpo")
    assert steps.disable and list(steps) == [0, 1]
    progress.report(steps, "[grpo seed 0] step 1", reward="0.500", doubt="2.25")
    out, err = capsys.readouterr()
    assert out == "[grpo seed 0] step 1 reward 0.500 doubt 2.25\n" and err == ""


def test_on_a_terminal_the_bar_shows_eta_and_values_instead_of_the_line(monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    steps = progress.bar(range(3), "grpo", 3)
    assert not steps.disable
    for step in steps:
        progress.report(steps, f"step {step}", reward="0.500", doubt="2.25")
    shown = terminal.getvalue()
    assert "grpo" in shown and "3/3" in shown and "<" in shown  # <: the ETA
    assert "reward=0.500, doubt=2.25" in shown
    assert capsys.readouterr().out == ""  # the bar replaces the line
    monkeypatch.setattr(parallel, "is_main", lambda: False)  # another rank: neither bar nor line
    other = progress.bar(range(1), "grpo")
    progress.report(other, "step 1", reward="0.5")
    progress.say("resumed")
    assert other.disable and capsys.readouterr().out == ""


# ---- --wandb: a fake module records what a W&B run would receive ----

class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        calls = self.calls
        return types.SimpleNamespace(log=lambda row, step: calls.append(("log", step, dict(row))),
                                     finish=lambda: calls.append(("finish",)))


def test_wandb_mirrors_every_metrics_row_of_every_arm(tmp_path, monkeypatch):
    needs_toy_model()
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    e2.main(TOY + ["--method", "all", "--wandb", "proj", "--out-dir", str(tmp_path),
                   "--steps", "1"])
    inits = [c[1] for c in fake.calls if c[0] == "init"]
    assert [i["name"] for i in inits] == [str(tmp_path / a / "seed0") for a in ARMS]
    assert all(i["project"] == "proj" and i["config"]["steps"] == 1 for i in inits)
    assert inits[1]["config"]["method"] == "sdpo"
    begins = [i for i, c in enumerate(fake.calls) if c[0] == "init"]
    for arm, begin in zip(ARMS, begins):
        logged = fake.calls[begin + 1:begin + 4]  # steps 0 and 1, then finish
        rows = common.read_metrics(tmp_path / arm / "seed0")
        assert logged[:-1] == [("log", r.pop("step"), r) for r in rows]
        assert logged[-1] == ("finish",)  # each arm its own W&B run
    final = json.loads((tmp_path / "grpo" / "seed0" / "final.json").read_text())
    assert final["settings"]["wandb"] == "proj"  # recorded; --resume ignores it (SWEEP_ONLY)


def test_missing_wandb_is_refused_naming_pip_install_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    loads = []
    monkeypatch.setattr(common, "load_model", lambda *a, **k: loads.append(a))
    with pytest.raises(SetupError, match="pip install wandb"):
        e2.main(["--model", "qwen3-8b", "--wandb", "proj", "--out-dir", str(tmp_path / "o")])
    assert loads == [] and not (tmp_path / "o").exists()
    script = str(ROOT / "exp03_ema_teacher.py")  # the command line, with wandb made unimportable
    argv = [script, "--wandb", "proj", "--out-dir", str(tmp_path / "o3")]
    code = (f"import runpy, sys; sys.modules['wandb'] = None; sys.argv = {argv!r}; "
            f"runpy.run_path({script!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "pip install wandb" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o3").exists()


def test_exp03_and_exp04_inherit_wandb_and_resume_ignores_it(tmp_path):
    for cls in (e2.Settings, e3.Settings, e4.Settings):
        assert cls().wandb == "" and "wandb" in cls.SWEEP_ONLY
    run = tmp_path / "run"
    run_dirs.start_run(run, e4.Settings(wandb="a"), sweep_only=e4.Settings.SWEEP_ONLY)
    (run / "final.json").write_text("{}")
    s = e4.Settings(wandb="b", resume=True)
    assert run_dirs.check_run(run, s, resume=True, sweep_only=s.SWEEP_ONLY) == "finished"
    assert json.loads((run / "config.json").read_text())["script"] == "exp04_coverage.py"


# ---- recheck.py ----

def run_script(script, args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / script)] + args, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_recheck_of_a_run_is_identical_and_names_an_edited_metric(tmp_path):
    needs_toy_model()
    made = run_script("exp02_onpolicy_grpo_sdpo.py", TOY + ["--out-dir", str(tmp_path)])
    assert made.returncode == 0, made.stderr[-2000:]
    run = tmp_path / "grpo" / "seed0"
    same = run_script("recheck.py", [str(run)])
    assert same.returncode == 0, same.stdout[-2000:] + same.stderr[-2000:]
    assert f"{run}: identical" in same.stdout
    final = json.loads((run / "final.json").read_text())
    final["final"]["time/step_s"] = 1e9  # time fields aside
    final["final"]["train/reward"] += 0.25
    (run / "final.json").write_text(json.dumps(final))
    edited = run_script("recheck.py", [str(run)])
    assert edited.returncode == 1, edited.stderr[-2000:]
    assert f"final/train/reward: run {final['final']['train/reward']}, re-run" in edited.stdout
    assert "1 of" in edited.stdout and "time/step_s" not in edited.stdout


def test_recheck_of_an_exp04_run_draws_its_coverage_set_again(tmp_path):
    """A coverage-1 run trains on one graph drawn from a pool sized by the sweep's largest
    coverage: exp02's default data (or another pool) would give other rewards. The config's
    script name is removed, as in runs written before it was recorded: it is inferred."""
    needs_toy_model()
    made = run_script("exp04_coverage.py", TOY + ["--coverages", "1,3", "--out-dir", str(tmp_path)])
    assert made.returncode == 0, made.stderr[-2000:]
    run = tmp_path / "cov1" / "grpo" / "seed0"
    config = json.loads((run / "config.json").read_text())
    assert config.pop("script") == "exp04_coverage.py"
    (run / "config.json").write_text(json.dumps(config))
    proc = run_script("recheck.py", [str(run)])
    assert proc.returncode == 0 and "with exp04_coverage.py" in proc.stdout, proc.stdout[-3000:]


def test_recheck_of_an_exp01_run_goes_through_run_seed(tmp_path):
    needs_toy_model()
    made = run_script("exp01_offpolicy.py", [
        "--max-questions", "4", "--max-candidates", "16", "--samples", "2", "--band-high", "2",
        "--eval-n", "8", "--sft-epochs", "1", "--sft-batch-size", "2", "--threads", "1",
        "--out-dir", str(tmp_path)])
    assert made.returncode == 0, made.stderr[-2000:]
    proc = run_script("recheck.py", [str(tmp_path / "seed0")])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"{tmp_path / 'seed0'}: identical" in proc.stdout


def test_differences_leave_time_and_sweep_settings_aside():
    nan = float("nan")
    old = {"final": {"train/reward": 0.5, "time/step_s": 1.0, "x": nan}, "train_time_s": 3.0,
           "settings": {"out_dir": "a", "steps": 2}}
    new = {"final": {"train/reward": 0.5, "time/step_s": 2.0, "x": nan}, "train_time_s": 4.0,
           "settings": {"out_dir": "b", "steps": 2}}
    assert recheck.differences(old, new, e2.Settings.SWEEP_ONLY) == (3, [])
    new["settings"]["steps"], new["final"]["y"] = 3, 1
    assert recheck.differences(old, new, e2.Settings.SWEEP_ONLY)[1] == [
        "settings/steps: run 2, re-run 3", "final/y: run (absent), re-run 1"]


def test_recheck_warns_about_another_commit_and_refuses_a_bare_directory(tmp_path):
    warnings = recheck.provenance_warnings(tmp_path, {"git_commit": "0" * 40, "git_dirty": True})
    assert any("made at commit 0000" in w for w in warnings)
    assert any("uncommitted changes" in w for w in warnings)
    with pytest.raises(FileNotFoundError, match="config.json"):
        recheck.main([str(tmp_path)])


def test_recheck_warns_about_another_cpu_and_config_records_this_one():
    here = run_dirs.environment_info()["cpu"]  # what a run's config.json records
    assert here == run_dirs.cpu_info()
    assert f"torch {torch.backends.cpu.get_cpu_capability()}" in here
    other = "Some CPU (family 1 model 2), torch DEFAULT"

    def about_cpu(config):
        return [w for w in recheck.provenance_warnings(Path("run"), config) if "made on" in w]

    assert about_cpu({"cpu": other}) == [f"warning: run: made on {other}, this is {here}"]
    assert about_cpu({"cpu": here}) == [] and about_cpu({}) == []  # {}: older runs
