"""Scale-up paths: one FSDP2-sharded update on 2 CPU processes (gloo) equals the single-process
update; rank shares; the vLLM backend's clear refusals; GPU-only checks (skipped without CUDA).

Run as a script under torchrun, this file is the worker of the 2-process test:
    python -m torch.distributed.run --nproc_per_node 2 tests/test_scale.py OUT_FILE
"""
import copy
import json
from dataclasses import replace
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from infra import loss_head, parallel, rollout  # noqa: E402
import tiny  # noqa: E402
from tiny import TINY  # noqa: E402
import exp02_onpolicy_grpo_sdpo as e  # noqa: E402

B, N_ROLLOUTS = 4, 2  # prompts, rollouts per prompt: 8 sequences, 2 mini-batches of 4
SETTINGS = e.Settings(model=TINY, prompts_per_step=B, rollouts=N_ROLLOUTS, mini_batches=2,
                      micro_batch_size=2, topk=8, logit_chunk=4, lr=1e-2, ema_rate=0.5)


def synthetic_data(pad: int) -> dict:
    """A fixed batch as collect() returns it, with rollout-engine log-probs (as from vLLM) so that
    the rollout correction and the log-prob gap are exercised too. A group's samples share their
    prompt (and, but for the last group, their teacher prompt), so the loss head's shared-prefix
    forward runs under FSDP2 too."""
    g = torch.Generator().manual_seed(0)
    seqs, teacher_seqs, flat = [], [], []
    for i in range(B * N_ROLLOUTS):
        if i % N_ROLLOUTS == 0:
            prompt = torch.randint(3, 250, (8 + 3 * (i % 3),), generator=g).tolist()
        response = torch.randint(3, 250, (4 + i % 4,), generator=g).tolist()
        if i % N_ROLLOUTS == 0 or i >= (B - 1) * N_ROLLOUTS:
            teacher_prompt = torch.randint(3, 250, (14 + i % 5,), generator=g).tolist()
        seqs.append((prompt, response))
        teacher_seqs.append((teacher_prompt, response))
        logprobs = (-2.0 + 0.3 * torch.randn(len(response), generator=g)).tolist()
        flat.append(rollout.Sample(response, "", "stop", logprobs))
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    has_demo = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    return {"flat": flat, "seqs": seqs, "teacher_seqs": teacher_seqs, "rewards": rewards, "has_demo": has_demo}


def this_ranks_share(data: dict) -> dict:
    """The sequences of this rank's prompts (whole groups), as train_arm hands collect() its prompts."""
    seq_ids = [p * N_ROLLOUTS + j for p in parallel.rank_share(B, SETTINGS.mini_batches) for j in range(N_ROLLOUTS)]
    return {k: v[seq_ids] if torch.is_tensor(v) else [v[i] for i in seq_ids] for k, v in data.items()}


def one_step(method: str) -> dict:
    """Build tiny-random student (+ teacher), shard them (a no-op in one process), run exp02's
    update() and EMA once -> full weights and logs (complete on rank 0)."""
    torch.manual_seed(0)
    student, tokenizer = tiny.tiny_random_model()
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as train_arm does for the math world
    teacher = copy.deepcopy(student).eval()
    for model in (student, teacher):
        parallel.shard_model(model, mixed_precision=False)
    shadows = [p.detach().float().clone() for p in student.parameters()]
    opt = torch.optim.AdamW(student.parameters(), lr=SETTINGS.lr, weight_decay=SETTINGS.weight_decay)
    data = this_ranks_share(synthetic_data(tokenizer.pad_token_id))
    epistemic_ids = torch.zeros(len(tokenizer), dtype=torch.bool)
    rollouts = e.Rollouts(samples=data["flat"], rewards=data["rewards"], grader=common.GradeReport(correct=[]),
                          seqs=data["seqs"], teacher_seqs=data["teacher_seqs"], has_demo=data["has_demo"])
    logs = e.update(replace(SETTINGS, method=method), student=student, teacher=teacher, opt=opt, rollouts=rollouts,
                    pad_id=tokenizer.pad_token_id, epistemic_ids=epistemic_ids, step=1)
    e.ema_update(shadows, teacher, student, SETTINGS.ema_rate)
    state = parallel.gather_full_state(student, opt)
    pushed = dict(parallel.full_weights(student))  # bf16 shards gathered (cast before the all-gather)
    return {"student": state["model"], "pushed": pushed,
            "teacher": parallel.gather_full_state(teacher)["model"],
            "shadows": parallel.gather_tensors(shadows), "grad_norm": logs["grad_norm"],
            "gap": logs["rollout_logprob_gap"], "roundtrip": checkpoint_roundtrip(state, tokenizer)}


def checkpoint_roundtrip(state: dict, tokenizer) -> bool:
    """A gathered checkpoint loaded into freshly sharded copies gathers back to the same state."""
    fresh, _ = tiny.tiny_random_model(seed=1)
    parallel.shard_model(fresh, mixed_precision=False)
    opt = torch.optim.AdamW(fresh.parameters(), lr=SETTINGS.lr)
    parallel.load_full_state(fresh, opt, copy.deepcopy(state) if parallel.is_main() else {})  # loading consumes it
    again = parallel.gather_full_state(fresh, opt)
    if not parallel.is_main():
        return True
    same_model = all(torch.equal(again["model"][k], v) for k, v in state["model"].items())
    same_optim = all(torch.equal(again["optimizer"]["state"][k]["exp_avg_sq"], v["exp_avg_sq"])
                     for k, v in state["optimizer"]["state"].items())
    return same_model and same_optim


def worker(out_file: str) -> None:
    torch.set_num_threads(1)
    parallel.init_distributed("cpu")
    assert parallel.world_size() == 2
    results = {method: one_step(method) for method in ("grpo", "sdpo")}
    if parallel.is_main():
        torch.save(results, out_file)
    parallel.shutdown_distributed(exit_code=0)


def torchrun(args: list[str], timeout: int = 240) -> str:
    """Run `torchrun --nproc_per_node 2 ARGS` on the CPU (gloo) -> its output; fails on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        log = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:  # a hung collective: end torchrun and both workers, not just torchrun
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0]
    assert proc.returncode == 0, log[-5000:]
    return log


@pytest.mark.slow
def test_fsdp2_two_process_update_equals_single_process(tmp_path):
    data, model = synthetic_data(0), tiny.tiny_random_model()[0].eval()  # the teacher shares
    assert [loss_head.prefix_sharing_pays(model, data["teacher_seqs"][i:i + 2], False)  # prefixes
            for i in range(0, 8, 2)] == [True, True, True, False]  # on one rank, not the other
    out = tmp_path / "sharded.pt"
    torchrun([__file__, str(out)])
    sharded = torch.load(out, weights_only=False)
    torch.set_num_threads(1)
    for method in ("grpo", "sdpo"):
        single, two = one_step(method), sharded[method]
        assert two["roundtrip"], "a gathered checkpoint does not load back into the shards"
        assert two["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
        assert two["gap"] == pytest.approx(single["gap"], rel=1e-5)
        base = tiny.tiny_random_model()[0].state_dict()
        moved = max((single["student"][k] - base[k]).abs().max().item() for k in base)
        assert moved > 1e-3, "the step did not change the weights: the comparison would prove nothing"
        for k, v in single["student"].items():
            assert torch.allclose(two["student"][k], v, atol=2e-5), (method, k)
        for k, v in single["teacher"].items():  # EMA on the shards = EMA on whole tensors
            assert torch.allclose(two["teacher"][k], v, atol=2e-5), (method, k)
        assert all(torch.allclose(a, b, atol=2e-5) for a, b in zip(two["shadows"], single["shadows"]))
        # cast, then gather == gather fp32, then cast: bit for bit
        for k, v in two["student"].items():
            pushed = two["pushed"][k]
            assert pushed.dtype == torch.bfloat16 and torch.equal(pushed, v.to(torch.bfloat16)), k


@pytest.mark.slow
def test_exp02_under_torchrun_trains_writes_once_and_resumes(tmp_path):
    """The whole script on 2 CPU processes: HF rollouts on the sharded model (synced forwards),
    sharded evaluation, EMA teacher, gathered checkpoints; rank 0 alone writes; --resume reloads
    the checkpoint into the shards."""
    from test_exp02 import write_paper_parquet

    write_paper_parquet(tmp_path / "train.parquet", [(f"What is {i}+1?", str(i + 1)) for i in range(4)])
    for name in ("aime24", "amc23"):
        write_paper_parquet(tmp_path / f"{name}.parquet", [("What is 3+3?", "6"), ("What is 1+3?", "4")])
    args = [str(ROOT / "exp02_onpolicy_grpo_sdpo.py"), "--model", TINY, "--method", "sdpo", "--ema-rate",
            "0.1", "--steps", "2", "--prompts-per-step", "4", "--rollouts", "2", "--max-new-tokens", "8", "--eval-k", "1",
            "--train-file", str(tmp_path / "train.parquet"), "--data-dir", str(tmp_path), "--out-dir",
            str(tmp_path / "out"), "--threads", "1", "--topk", "16", "--checkpoint-every", "1"]
    log = torchrun(args)
    assert log.count("| SDPO c = s |") == 1 and log.count("step 2 reward") == 1  # printed by rank 0 only
    run = tmp_path / "out" / "sdpo_s" / "seed0"
    assert [r["step"] for r in common.read_metrics(run)] == [0, 1, 2]
    first = (run / "final.json").read_text()
    (run / "final.json").unlink()
    torchrun(args + ["--resume"])  # continues after the step-2 checkpoint: nothing left to train
    assert [r["step"] for r in common.read_metrics(run)] == [0, 1, 2]
    assert json.loads((run / "final.json").read_text())["final"] == json.loads(first)["final"]


def test_rank_share_keeps_each_mini_batch_split_across_ranks(monkeypatch):
    """Rank r takes the r-th contiguous part of every mini-batch: optimizer step j sees the same
    prompts as in one process, and groups never straddle ranks."""
    monkeypatch.setattr(parallel, "world_size", lambda: 2)
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(parallel, "rank", lambda r=r: r)
        shares.append(parallel.rank_share(8, 2))
    assert shares == [[0, 1, 4, 5], [2, 3, 6, 7]]
    monkeypatch.setattr(parallel, "world_size", lambda: 1)
    monkeypatch.setattr(parallel, "rank", lambda: 0)
    assert parallel.rank_share(8, 2) == list(range(8))


def test_sharded_generator_pads_equal_shares_and_returns_everything(monkeypatch):
    class Echo:
        def generate(self, prompts, seed=0, **kwargs):
            return [[rollout.Sample(p, str(seed), "stop")] for p in prompts]

    monkeypatch.setattr(parallel, "world_size", lambda: 2)
    monkeypatch.setattr(parallel, "rank", lambda: 1)
    seen = []
    monkeypatch.setattr(parallel, "gather_objects", lambda obj: seen.append(obj) or [[["r0"]] * 2, obj])
    out = parallel.ShardedGenerator(Echo()).generate([[1], [2], [3]], seed=5)
    assert [s.token_ids for g in seen[0] for s in g] == [[3]]  # rank 1's share of 3 prompts: the last one
    assert len(out) == 3 and out[-1][0].text == str(5 + 1_000_003)  # each rank samples its own stream


def test_vllm_backend_refusals_name_the_fix(monkeypatch):
    monkeypatch.setattr(rollout.importlib.util, "find_spec", lambda name: None)  # vllm not installed
    with pytest.raises(common.SetupError, match="requirements-(gpu|vllm-cpu).txt"):
        rollout.check_vllm(live=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rollout.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(rollout.importlib.metadata, "version", lambda name: "0.9.0")
    with pytest.raises(common.SetupError, match=f"vllm=={rollout.VLLM_VERSION}"):
        rollout.check_vllm(live=True)
    rollout.check_vllm(live=False)  # sampling from a fixed model: any installed version
    with pytest.raises(common.SetupError, match="--backend hf"):  # a model built in memory has no path for vLLM
        monkeypatch.setattr(rollout.importlib.metadata, "version", lambda name: rollout.VLLM_VERSION)
        rollout.make_generator(None, None, "vllm", model_path=None, live=True)


def test_hf_generator_follows_the_trainer_without_a_push():
    model, tok, _ = common.load_model(TINY)
    gen = rollout.make_generator(model, tok, "hf", live=True)
    gen.sleep()
    gen.load_weights(parallel.full_weights(model))  # no-ops: it samples from the trainer's own module
    assert gen.model is model


@pytest.mark.gpu
def test_loss_head_peak_memory_on_cuda_stays_under_the_stated_bound():
    """Peak CUDA memory of the chunked loss head (forward + backward) with the real vocabulary:
    under 6 fp32 (chunk x V) buffers plus the (N x H) hidden states (README "Benchmarks")."""
    torch.manual_seed(0)
    n, h, v, k, chunk = 8192, 64, 151936, 100, 1024
    hidden = torch.randn(n, h, device="cuda", requires_grad=True)
    weight = torch.randn(v, h, device="cuda", requires_grad=True)
    targets = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    outs = [torch.utils.checkpoint.checkpoint(loss_head._chunk_stats, hidden[a:a + chunk], weight, targets[a:a + chunk], k,
                                              None, use_reentrant=False) for a in range(0, n, chunk)]
    (torch.cat([o[0] for o in outs]).sum() + torch.cat([o[1] for o in outs]).exp().sum()).backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 6 * chunk * v * 4 + 2 * v * h * 4 + n * h * 4, peak


@pytest.mark.gpu
def test_vllm_engine_takes_pushed_weights(tmp_path):
    """GPU + vllm only: an engine built from a saved tiny model, with its weights replaced by
    push (zeros in the head), must change its greedy output; the log-probs come back per token."""
    if importlib_missing("vllm"):
        pytest.skip("vllm is not installed (pip install -r requirements-gpu.txt)")
    model, tok = tiny.tiny_random_model()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    gen = rollout.VLLMGenerator(str(tmp_path), live=True, gpu_memory_utilization=0.2, max_model_len=256)
    prompt = [common.prompt_ids(tok, "hi", thinking=True)]
    before = gen.generate(prompt, temperature=0.0, max_tokens=8)[0][0]
    assert before.logprobs is not None and len(before.logprobs) == len(before.token_ids)
    gen.sleep()
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit becomes 0: greedy picks token 0
    gen.load_weights(parallel.full_weights(model))
    after = gen.generate(prompt, temperature=0.0, max_tokens=8)[0][0]
    assert after.token_ids != before.token_ids and set(after.token_ids) == {0}


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


if __name__ == "__main__":
    worker(sys.argv[1])
