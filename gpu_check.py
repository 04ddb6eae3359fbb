"""GPU check: one command, one GPU, under 8 minutes, one JSON file. Stock PyTorch + transformers
(no vLLM, no math-verify needed: nothing here grades), random weights from configs (no download).

    python gpu_check.py --out results/bench/gpu_check.json      # one H100 / H200
    python gpu_check.py --dry-run                               # the plan and sizes, no compute
    python gpu_check.py --tiny --device cpu --out /tmp/g.json   # every CPU-capable part, tiny sizes

Parts (each timed; a part that fails is recorded and the others still run; the JSON is rewritten
after every part, so a killed run keeps what finished; parts are skipped once --budget-s is spent):
 a. fsdp_equals_unsharded: exp02's update (GRPO and SDPO) of a Qwen3-1.7B-width model (2
    layers, the real vocabulary) with fp32 master weights and bf16 compute, sharded by FSDP2
    over a 1-rank process group (mixed-precision policy: bf16 gathers, fp32 reduction) against
    the same update unsharded (bf16 autocast). Both compute in bf16 but round differently (FSDP2
    casts every parameter, embeddings and norms included, so the residual stream is bf16;
    autocast keeps them fp32 outside matmuls), so the tolerance is bf16's, chosen without a GPU
    to measure it: gradients' cosine >= 0.995 and relative L2 gap <= 0.1; losses within 2% (of
    at least 1e-3: GRPO's first-step loss is ~0). On the CPU (fp32 on both sides): 1e-4.
 b. loss_head_cuda_peak: exp02's chunked loss head on 20,480 response tokens, vocabulary
    151,936, hidden 2048: CUDA peak against the README's bound.
 c. update: exp02's update at Qwen3-1.7B size (28 layers, random weights) on 8 sequences of
    512 + 7,680 tokens (GRPO; SDPO adds a bf16 teacher on 15,872-token sequences): tokens/s and
    MFU (benchmark_training.py's FLOP count; peak from its table by GPU name).
 d. generation: transformers generate (exp02's HFGenerator, fp32 weights as the trainer holds
    them) of 32 samples x 1,024 new tokens from 512-token prompts: tokens/s.
Estimated time on one H200: about 3-4 minutes (imports and model builds ~40 s, a ~20 s, b ~5 s,
c ~90 s, d ~40 s); the default --budget-s 420 stops starting parts after 7 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
import traceback
from types import SimpleNamespace

import torch

import benchmark_training as bench
import common
import exp02_onpolicy_grpo_sdpo as exp02
from infra import parallel, run_dirs

FULL = dict(
    a=dict(
        preset="qwen3-1.7b",
        layers=2,
        batch=4,
        rollouts=2,
        prompt_len=256,
        response_len=768,
        micro_batch=2,
    ),
    b=dict(tokens=20480, vocab=151936, hidden=2048, topk=100, chunk=2048),
    c=dict(
        preset="qwen3-1.7b",
        layers=None,
        batch=8,
        rollouts=4,
        prompt_len=512,
        response_len=7680,
        micro_batch=4,
        steps=2,
        warmup=1,
    ),
    d=dict(batch=32, rollouts=4, prompt_len=512, response_len=1024),
)
TINY = dict(
    a=dict(
        preset="tiny-random",
        layers=None,
        batch=4,
        rollouts=2,
        prompt_len=8,
        response_len=24,
        micro_batch=2,
    ),
    b=dict(tokens=512, vocab=1024, hidden=64, topk=16, chunk=128),
    c=dict(
        preset="tiny-random",
        layers=None,
        batch=4,
        rollouts=2,
        prompt_len=16,
        response_len=48,
        micro_batch=2,
        steps=1,
        warmup=0,
    ),
    d=dict(batch=4, rollouts=2, prompt_len=8, response_len=16),
)


def bench_args(size: dict, **extra) -> SimpleNamespace:
    """The argument namespace benchmark_training's pieces expect."""
    args = dict(topk=100, logit_chunk=2048, steps=1, warmup=0, peak_tflops=None, layers=None)
    args.update(size, **extra)
    args["teacher_prompt_len"] = args["prompt_len"] + args["response_len"]  # a demonstration
    return SimpleNamespace(**args)


def one_rank_group(device: str) -> None:
    """A 1-rank process group (NCCL on CUDA, gloo on the CPU), so that FSDP2 shards for real."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=0, world_size=1)


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a full fp32 copy of every gradient at each step (for the comparison)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.grads = []

    def step(self, closure=None):
        self.grads.append(
            [
                parallel.full_tensor(p.grad).detach().float().clone()
                for group in self.param_groups
                for p in group["params"]
                if p.grad is not None
            ]
        )
        return super().step(closure)


def update_once(args, method: str, device: str, sharded: bool) -> dict:
    """One exp02 update (one mini-batch) from seed-0 random weights -> losses and gradients."""
    student, pad, _ = bench.build_model(args.preset, args.layers, device)
    vocab = student.get_output_embeddings().weight.shape[0]
    args.topk = min(args.topk, vocab)
    cuda = device.startswith("cuda")
    teacher = None
    if method == "sdpo":  # the same seed-0 weights, in the teacher's dtype (bf16 on CUDA)
        teacher = bench.build_model(args.preset, args.layers, device)[0]
        teacher = teacher.to(torch.bfloat16 if cuda else torch.float32).eval()
    if sharded:
        for model in (student, teacher):
            if model is not None:
                parallel.shard_model(model, mixed_precision=cuda)
    data = bench.synthetic_data(args, vocab)
    s = bench.update_settings(args)
    opt = RecordingAdamW(
        student.parameters(), lr=s.lr, betas=(0.9, 0.999), weight_decay=s.weight_decay
    )
    epistemic = torch.zeros(vocab, dtype=torch.bool, device=device)
    logs = exp02.update(dataclasses.replace(s, method=method), student=student, teacher=teacher,
                        opt=opt, rollouts=bench.rollouts_of(data), pad_id=pad,
                        epistemic_ids=epistemic, step=1)
    from torch.distributed.fsdp import FSDPModule

    return {
        "loss": logs["loss"],
        "grad_norm": logs["grad_norm"],
        "grads": opt.grads[0],
        "fsdp": isinstance(student, FSDPModule),
    }


def compare_updates(args, device: str) -> dict:
    """Part a: the sharded update against the unsharded one, per method."""
    cuda = device.startswith("cuda")
    tol = (
        dict(cosine=0.995, rel_l2=0.1, loss_rel=0.02)
        if cuda
        else dict(cosine=1 - 1e-6, rel_l2=1e-4, loss_rel=1e-5)
    )
    out = {
        "tolerance": tol,
        "compute": "bf16 (FSDP2 mixed precision vs autocast)" if cuda else "fp32",
    }
    one_rank_group(device)
    for method in ("grpo", "sdpo"):
        ref = update_once(bench_args(vars(args)), method, device, sharded=False)
        got = update_once(bench_args(vars(args)), method, device, sharded=True)
        g_ref = torch.cat([g.flatten() for g in ref["grads"]])
        g_got = torch.cat([g.flatten() for g in got["grads"]])
        cosine = torch.nn.functional.cosine_similarity(g_ref, g_got, dim=0).item()
        rel_l2 = ((g_got - g_ref).norm() / g_ref.norm()).item()
        # GRPO's first-step loss is ~0 (ratio 1, zero-mean advantages): relative to >= 1e-3
        loss_rel = abs(got["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-3)
        out[method] = {
            "loss_unsharded": ref["loss"],
            "loss_fsdp2": got["loss"],
            "loss_rel_gap": loss_rel,
            "grad_norm_unsharded": ref["grad_norm"],
            "grad_norm_fsdp2": got["grad_norm"],
            "grad_cosine": cosine,
            "grad_rel_l2": rel_l2,
            "fsdp2_sharded": got["fsdp"],
            "pass": got["fsdp"]
            and not ref["fsdp"]
            and cosine >= tol["cosine"]
            and rel_l2 <= tol["rel_l2"]
            and loss_rel <= tol["loss_rel"],
        }
        del ref, got, g_ref, g_got
        free(device)
    out["pass"] = out["grpo"]["pass"] and out["sdpo"]["pass"]
    return out


def throughput(args, device: str) -> dict:
    """Part c: update tokens/s and MFU (benchmark_training.bench_update)."""
    if args.peak_tflops is None and device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        args.peak_tflops = next((v for k, v in bench.PEAK_TFLOPS.items() if k in name), None)
    student, pad, _ = bench.build_model(args.preset, args.layers, device)
    vocab = student.get_output_embeddings().weight.shape[0]
    args.topk = min(args.topk, vocab)
    data = bench.synthetic_data(args, vocab)
    out = {
        "parameters": sum(p.numel() for p in student.parameters()),
        "peak_tflops": args.peak_tflops,
        "sequence_tokens": args.prompt_len + args.response_len,
        "sequences": args.batch,
    }
    out["grpo_update"] = bench.bench_update(args, "grpo", student, None, data, pad, device)
    teacher = bench.build_model(args.preset, args.layers, device)[0]
    teacher = teacher.to(torch.bfloat16 if device.startswith("cuda") else torch.float32).eval()
    out["sdpo_update"] = bench.bench_update(args, "sdpo", student, teacher, data, pad, device)
    if device.startswith("cuda"):
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    del teacher
    return out, student, pad


def free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def plan(args) -> dict:
    sizes = TINY if args.tiny else FULL
    return {
        "device": args.device,
        "tiny": args.tiny,
        "budget_s": args.budget_s,
        "sizes": sizes,
        "parts": ["fsdp_equals_unsharded", "loss_head_cuda_peak", "update", "generation"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/bench/gpu_check.json")
    p.add_argument("--device", default=common.default_device())
    p.add_argument(
        "--tiny", action="store_true", help="tiny sizes (tiny-random model): a smoke test anywhere"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument(
        "--budget-s", type=float, default=420.0, help="start no part after this many seconds"
    )
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.dry_run:
        print(json.dumps(plan(args), indent=2))
        return plan(args)
    if not args.device.startswith("cuda") and not args.tiny:
        raise SystemExit(
            "gpu_check.py: no CUDA device here; run it on a GPU, or use --tiny --device cpu "
            "for a smoke test of the CPU-capable parts"
        )
    parallel.cpu_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.cuda.set_device(args.device)
    t_start, sizes = time.perf_counter(), TINY if args.tiny else FULL
    env = run_dirs.environment_info()
    result = {
        "plan": plan(args),
        "machine": {
            "device": env["cuda"] or f"CPU, {os.cpu_count()} cores",
            "platform": env["platform"],
        },
        "packages": env["packages"],
        "parts": {},
    }
    state = {}

    def run_part(name, fn):
        if time.perf_counter() - t_start > args.budget_s:
            result["parts"][name] = {"skipped": f"--budget-s {args.budget_s} spent"}
        else:
            t0 = time.perf_counter()
            try:
                result["parts"][name] = fn()
            except Exception as e:  # noqa: BLE001 -- recorded; the other parts still run
                result["parts"][name] = {
                    "error": f"{e.__class__.__name__}: {e}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            result["parts"][name]["part_seconds"] = time.perf_counter() - t0
        result["total_seconds"] = time.perf_counter() - t_start
        common.write_json_atomic(args.out, result)
        print(f"[gpu_check] {name}: {json.dumps(result['parts'][name])[:600]}", flush=True)
        free(args.device)

    def part_c():
        out, state["model"], state["pad"] = throughput(bench_args(sizes["c"]), args.device)
        return out

    def part_d():
        if "model" not in state:
            raise RuntimeError("part c did not build the model")
        model, pad = state.pop("model"), state.pop("pad")
        d = bench_args(sizes["d"])
        return bench.bench_generation(d, model.eval(), pad, model.config.eos_token_id, args.device)

    run_part(
        "fsdp_equals_unsharded", lambda: compare_updates(SimpleNamespace(**sizes["a"]), args.device)
    )
    if args.device.startswith("cuda"):
        run_part("loss_head_cuda_peak", lambda: bench.loss_head_cuda_peak(**sizes["b"]))
    else:
        result["parts"]["loss_head_cuda_peak"] = {"skipped": "needs CUDA"}
    run_part("update", part_c)
    run_part("generation", part_d)
    result["ok"] = all("error" not in v and v.get("pass", True) for v in result["parts"].values())
    common.write_json_atomic(args.out, result)
    print(
        f"[gpu_check] ok={result['ok']} in {result['total_seconds']:.0f} s -> {args.out}",
        flush=True,
    )
    parallel.shutdown_distributed()  # the 1-rank group: no process exit here
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
