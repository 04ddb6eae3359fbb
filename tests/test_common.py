"""Model presets, prompts, generation, run directories and settings parsing; and the
tiny-random integration test prompt -> generate -> grade -> metrics."""
import json
import math
import os
import pathlib
import sys
from dataclasses import dataclass

import pytest
import torch

import common
from infra import run_dirs
from infra import loss_head, rollout, settings  # noqa: E402
import math_world  # noqa: E402
from tiny import TINY, TINY_R1  # noqa: E402


def test_unknown_model_lists_the_presets():
    with pytest.raises(ValueError) as e:
        common.resolve_preset("qwen9-huge")
    for name in ("qwen3-8b", "qwen3-8b-nothink", "deepseek-r1-distill-qwen-7b", "olmo3-7b-instruct", "toy"):
        assert name in str(e.value)


def test_presets_carry_the_paper_sampling():
    for name, p in common.PRESETS.items():
        assert {"hub_id", "thinking", "think_in_prompt", "temperature", "top_p", "world"} <= set(p), name
    assert (common.PRESETS["qwen3-8b"]["temperature"], common.PRESETS["qwen3-8b"]["top_p"]) == (0.6, 0.95)
    assert (common.PRESETS["qwen3-8b-nothink"]["temperature"], common.PRESETS["qwen3-8b-nothink"]["top_p"]) == (0.7, 0.8)
    assert common.PRESETS["qwen3-8b-nothink"]["thinking"] is False
    assert common.PRESETS["deepseek-r1-distill-qwen-7b"]["think_in_prompt"] is True
    assert common.resolve_preset("org/some-model")["hub_id"] == "org/some-model"


def test_chat_template_thinking_flag_and_think_in_prompt():
    _, tok, _ = common.load_model(TINY)
    on, off = common.prompt_text(tok, "hi", True), common.prompt_text(tok, "hi", False)
    assert "</think>" not in on and off.endswith("<think>\n\n</think>\n\n")
    assert not common.opens_think_in_prompt(tok)
    _, tok_r1, preset = common.load_model(TINY_R1)
    assert common.opens_think_in_prompt(tok_r1) and preset["think_in_prompt"]
    assert tok.decode(common.prompt_ids(tok, "x = \\frac{1}{2}", True)) == on.replace("hi", "x = \\frac{1}{2}")


def test_pack_sequences_masks_prompt_and_padding():
    ids, mask, labels = loss_head.pack_sequences([([1, 2], [3]), ([4], [5, 6, 7])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, 3, -100], [-100, 5, 6, 7]]


def test_generation_is_seeded_and_reports_finish_reasons():
    model, tok, preset = common.load_model(TINY)
    gen = rollout.make_generator(model, tok, backend="hf")
    prompts = [common.prompt_ids(tok, "What is 1+1?", True)] * 2
    a = gen.generate(prompts, n=3, temperature=1.0, max_tokens=8, seed=7)
    b = gen.generate(prompts, n=3, temperature=1.0, max_tokens=8, seed=7)
    assert [[s.token_ids for s in g] for g in a] == [[s.token_ids for s in g] for g in b]
    assert len(a) == 2 and all(len(g) == 3 for g in a)
    for s in (s for g in a for s in g):
        assert len(s.token_ids) <= 8
        assert s.finish_reason == ("stop" if s.token_ids[-1] == tok.eos_token_id else "length")
    with pytest.raises(ValueError, match="backend"):
        rollout.make_generator(model, tok, backend="tpu")


def test_decode_matches_transformers_generate_and_shares_the_prompt(monkeypatch):
    """Our decoding loop (one prefill per prompt, stopped rows dropped) against transformers
    `generate` on the toy model: the same greedy tokens for prompts of different lengths (left
    padding) and rows that stop at different steps, with the prefill in one chunk or in chunks
    of 5 prompts; top-k 1 sampling is greedy; n samples of a prompt are the same greedy row n
    times."""
    import toy_world
    from transformers import GenerationConfig

    model, tok, preset = common.load_model("toy")
    problems = [p for cell in ("in_domain", "ood_d5", "ood_l5")
                for p in toy_world.evaluation_sets(12)[cell]]
    prompts = [common.prompt_ids(tok, p["prompt"], preset["thinking"]) for p in problems]
    assert len(set(map(len, prompts))) == 3
    gen = rollout.HFGenerator(model, tok)
    ours = [g[0].token_ids for g in gen.generate(prompts, temperature=0.0, max_tokens=40)]
    ids, mask = rollout.left_pad(prompts, tok.pad_token_id)
    config = GenerationConfig(do_sample=False, max_new_tokens=40, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=mask,
                                generation_config=config)[:, ids.shape[1]:].tolist()
    theirs = [x[:x.index(tok.eos_token_id) + 1] if tok.eos_token_id in x else x for x in theirs]
    assert ours == theirs
    assert len({len(x) for x in ours}) > 3  # rows stopped at different steps
    monkeypatch.setattr(rollout, "PREFILL_ROWS", 5)  # 36 prompts: 8 chunks, their caches stacked
    assert [g[0].token_ids for g in gen.generate(prompts, temperature=0.0, max_tokens=40)] == ours
    top1 = gen.generate(prompts, n=2, temperature=1.0, top_k=1, max_tokens=40, seed=3)
    assert [[s.token_ids for s in g] for g in top1] == [[x, x] for x in ours]


def test_tiny_random_integration_prompt_generate_grade_metrics():
    model, tok, preset = common.load_model(TINY)
    gen = rollout.make_generator(model, tok, backend="hf")
    problems = [{"prompt": "What is 1+1?", "gold": "2"}, {"prompt": "What is 2+2?", "gold": "4"}]
    metrics, rows = common.evaluate(gen, tok, preset, problems, k=4, temperature=1.0, top_p=1.0, max_tokens=12,
                                    grade=math_world.grade)
    assert len(rows) == 8 and {r["problem"] for r in rows} == {0, 1}
    assert 0 <= metrics["avg@4"] <= metrics["pass@4"] <= 1
    assert metrics["avg@4"] == sum(r["correct"] for r in rows) / 8
    assert 0 < metrics["response_length"] <= 12
    assert metrics["truncation_rate"] == sum(r["finish_reason"] == "length" for r in rows) / 8
    for key in ("thinking_length", "epistemic/wait", "epistemic/total", "epistemic/total_per_1k_tokens",
                "grader/timeouts", "grader/errors"):
        assert key in metrics
    # The same grader on a response we know is right: the pipeline grades, not just runs.
    report = math_world.grade(["<think>easy</think>\n\\boxed{2}"], ["2"], preset["think_in_prompt"])
    assert report.correct == [True]


def test_run_directory_atomic_and_never_overwritten(tmp_path):
    @dataclass
    class S:
        seed: int = 3
        """a seed"""

    run = run_dirs.start_run(tmp_path / "run", S())
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["settings"] == {"seed": 3} and "torch" in cfg["packages"] and "git_commit" in cfg
    run_dirs.log_metrics(run, 1, {"train/reward": 0.5})
    run_dirs.log_metrics(run, 2, {"train/reward": 0.75})
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    run_dirs.write_samples(run, "eval", [{"a": 1}])
    run_dirs.finish_run(run, {"done": True})
    assert not list(run.rglob(".*.tmp*"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_dirs.start_run(run, S())
    run_dirs.start_run(run, S(), overwrite=True)
    assert not (run / "metrics.jsonl").exists()


def test_parse_settings_flags_and_world_defaults():
    @dataclass
    class S:
        lr: float = settings.arg(1e-5, "learning rate")
        steps: int | None = settings.arg(None, "training steps", toy=60, math=100)
        greedy: bool = settings.arg(False, "decode greedily")
        forcing: bool | None = settings.arg(None, "budget forcing", toy=True, math=False)

    s = settings.parse_settings(S, ["--lr", "3e-4", "--steps", "5", "--greedy", "--forcing"])
    assert (s.lr, s.steps, s.greedy, s.forcing) == (3e-4, 5, True, True)
    assert settings.world_defaults(settings.parse_settings(S, []), "math") == S(steps=100, forcing=False)
    assert settings.world_defaults(S(steps=7), "toy") == S(steps=7, forcing=True)  # a given flag stays
    with pytest.raises(SystemExit):
        settings.parse_settings(S, ["--lr", "fast"])


def test_help_shows_the_value_each_world_uses_and_runs_under_cprofile():
    """--help names the toy and math value of every world-dependent setting (never `None`), and
    works when the script runs under `python -m cProfile` (no source re-reading)."""
    import subprocess

    script = str(pathlib.Path(common.__file__).parent / "exp02_onpolicy_grpo_sdpo.py")
    proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", os.devnull, script, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    assert "None" not in text
    for part in ("training steps (default: toy: 60, math: 100)", "toy: 0.0002, math: grpo 1e-06 / sdpo 1e-05",
                 "(default: toy: 0, math: 100)"):
        assert part in text, part


def test_offline_hub_errors_suggest_local_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="--data-dir"):
        math_world.load_problems("aime24")
    with pytest.raises(RuntimeError, match="--model PATH"):
        common.load_model("qwen3-1.7b")
    with pytest.raises(ValueError, match="aime24"):
        math_world.load_problems("aime2030")


def test_load_problems_from_local_files(shared_data):
    problems = math_world.load_problems("aime25", data_dir=str(shared_data / "paper" / "evaluation"))
    assert len(problems) == 30 and all(p["prompt"].endswith(math_world.INSTRUCTION) for p in problems)


def test_every_module_imports_without_vllm():
    import importlib
    import pathlib

    root = pathlib.Path(common.__file__).parent
    for path in sorted(root.glob("*.py")) + sorted(root.glob("infra/*.py")):
        importlib.import_module(".".join(path.relative_to(root).with_suffix("").parts))
    assert "vllm" not in sys.modules  # imported lazily, only by the vLLM backend


def test_next_token_prob_reads_the_last_real_position_of_each_row():
    """A hand-built model state: logits that depend only on the input token, so P(word) after a
    prompt is known exactly; rows of different lengths (right padding) read their own end."""
    import toy_world as tw
    tok = tw.build_tokenizer()
    preset = common.resolve_preset("toy")
    maybe, wait = tok.convert_tokens_to_ids("maybe"), tok.convert_tokens_to_ids("wait")
    short = tok.convert_tokens_to_ids("n1")

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, len(tw.VOCAB))  # (B, T, V)
            logits[..., maybe] = torch.where(input_ids == short, math.log(3 * (len(tw.VOCAB) - 1)),
                                             0.0)  # after n1: P(maybe) = 3/4
            logits[..., wait] = torch.where(input_ids == tok.pad_token_id, 50.0, 0.0)
            return type("Out", (), {"logits": logits})

    items = [("edges", "<think> n1"), ("edges n3 n4 , n5 n6 start n3 target n4", "<think> n2")]
    p = common.next_token_prob(Fixed(), tok, preset, items, "maybe")
    assert p == pytest.approx((0.75 + 1 / len(tw.VOCAB)) / 2, rel=1e-6)
