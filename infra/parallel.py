"""Parallelism plumbing: torchrun process groups, FSDP2 sharding, gathers and broadcasts.

Infrastructure only (the science is in the experiments, common.py and the worlds). Launched
without torchrun, every function is the identity or a no-op, so a script reads the same on one
process and on many."""
from __future__ import annotations

import atexit
import contextlib
import os

import numpy as np
import torch


def cpu_threads(n: int) -> None:
    """Use n CPU threads and flush denormal floats to zero (they make CPU matmuls ~100x slower).
    numpy < 2.4 computes a float type's limits on first use and, under flush-to-zero, warns that
    its smallest subnormal is zero (at any later parquet read): compute them first."""
    torch.set_num_threads(n)
    for dtype in (np.float16, np.float32, np.float64):
        np.finfo(dtype)
    torch.set_flush_denormal(True)


def init_distributed(device: str) -> str:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL with one GPU per rank, gloo on
    CPU) -> this rank's device. Without torchrun: `device` unchanged, no process group."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if dist.is_initialized():  # a second arm or seed in the same run
        return device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    atexit.register(
        lambda: dist.is_initialized() and dist.destroy_process_group()
    )  # a rank that failed
    return device


def shutdown_distributed(exit_code: int | None = None) -> None:
    """After a run that succeeded on every rank: end the process group together. The barrier keeps
    a rank from tearing down its connections while a peer still uses them. No-op without a
    process group.

    With `exit_code`, the process then ends at once (os._exit, after closing the grader pool and
    flushing output), skipping the interpreter's teardown: FSDP2 keeps references to the process
    group (its device mesh, its shard group), so destroy_process_group does not free it and gloo's
    threads (gloo_tcp_loop, pt_gloo_runloop) outlive it into the interpreter's finalization,
    where a rank aborted now and then after its output was complete ("terminate called without an
    active exception", SIGABRT; the likely path: a C++ thread that needs the GIL during
    finalization is ended by pthread_exit, whose unwinding through C++ calls std::terminate).
    Without FSDP2 the same destroy ends those threads."""
    import sys

    import torch.distributed as dist

    from infra import grader_pool

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    if exit_code is None:
        return
    grader_pool.shutdown()  # what atexit would have done
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(exit_code)


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the only process that writes files and prints."""
    return rank() == 0


def rank_share(n: int, blocks: int) -> list[int]:
    """Indices of this rank's items among n: the rank's contiguous 1/world of each of `blocks`
    equal consecutive blocks. With blocks = optimizer mini-batches, optimizer step j sees exactly
    the items it sees in a single process; one rank and one block: everything."""
    per_block, w = n // blocks, world_size()
    per_rank = per_block // w
    return [b * per_block + rank() * per_rank + i for b in range(blocks) for i in range(per_rank)]


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled); [obj] in a single process."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def main_only(fn, *args, **kwargs):
    """Run fn on rank 0 only; every rank returns its result or raises its error, so that (say) a
    refused run directory stops all ranks alike instead of leaving them waiting."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    import torch.distributed as dist

    box = [None]
    if is_main():
        try:
            box = [(True, fn(*args, **kwargs))]
        except Exception as e:  # noqa: BLE001 -- re-raised on every rank below
            box = [(False, e)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def bf16_compute(device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp32 master weights, bf16 matmuls), nothing on CPU. Under FSDP2 the
    mixed-precision policy already gathers bf16 parameters; autocast then changes nothing."""
    device = torch.device(device)
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )


def shard_model(model, mixed_precision: bool) -> None:
    """FSDP2 (`fully_shard`) over all ranks: each decoder layer, then the root (embeddings, final
    norm, head). With mixed_precision, parameters are all-gathered in bf16 for compute and
    gradients reduce-scattered in fp32, while the sharded parameters (and so the optimizer's
    master weights) keep their own dtype. No process group (a single process): nothing; a
    1-rank group (gpu_check.py) shards over that one rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # HF returns views of its outputs; we never modify them in place, so FSDP's warning is moot.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp_policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)


def is_sharded(model) -> bool:
    """Whether shard_model sharded this model (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model) -> None:
    """Free an FSDP2 root's gathered parameters after a no-grad forward: the root keeps them after
    its forward (so that the loss head can use the output embedding outside the module), and only
    a backward frees them otherwise. Not sharded: nothing."""
    if is_sharded(model):
        model.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every rank must call it); else t itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_weights(model, dtype=torch.bfloat16):
    """(name, full tensor) for every entry of the state dict, gathered one tensor at a time (peak
    extra memory: one tensor), for pushing into a rollout engine. Every rank must consume it.
    Each shard is cast before the all-gather (bf16: half the traffic of gathering fp32; the
    cast is elementwise, so the tensors are the same)."""
    for name, t in model.state_dict().items():
        yield name, full_tensor(t.detach().to(dtype))


def gather_full_state(model, optimizer=None) -> dict:
    """{"model": full fp32 state dict, "optimizer": full optimizer state} on CPU, for checkpoints:
    complete on rank 0, empty on the other ranks (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=options)}
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optim_state}


def load_full_state(model, optimizer, state: dict) -> None:
    """Inverse of gather_full_state: rank 0's full state (other ranks pass {}) into every rank's
    shards, broadcast from rank 0."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world_size() > 1)
    set_model_state_dict(
        model, state.get("model", {}), options=options
    )  # (set_state_dict skips an empty dict)
    set_optimizer_state_dict(model, optimizer, state.get("optimizer", {}), options=options)


def gather_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Full CPU copies of (possibly sharded) tensors, e.g. the EMA teacher's fp32 shadows."""
    return [full_tensor(t).detach().cpu() for t in tensors]


@torch.no_grad()
def scatter_tensors(tensors: list[torch.Tensor], full: list[torch.Tensor] | None) -> None:
    """Copy rank 0's full tensors (other ranks pass None) into each rank's shard of `tensors`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for i, t in enumerate(tensors):
        if not isinstance(t, DTensor):
            t.copy_(full[i])
            continue
        import torch.distributed as dist

        whole = (
            full[i].to(t.device)
            if is_main()
            else torch.empty(t.shape, dtype=t.dtype, device=t.device)
        )
        dist.broadcast(whole, src=0)
        t.copy_(distribute_tensor(whole, t.device_mesh, t.placements, src_data_rank=None))


class ShardedGenerator:
    """Wraps a generator for evaluation under torchrun: each rank samples a contiguous share of
    the prompts and every rank gets all samples back in order. Shares are padded to equal size,
    so that FSDP's collective forwards (transformers backend) stay in step. One rank: a
    pass-through."""

    def __init__(self, generator):
        self.generator = generator

    def generate(self, prompts: list[list[int]], seed: int = 0, **kwargs) -> list:
        per = -(-len(prompts) // world_size())
        mine = prompts[rank() * per:(rank() + 1) * per]
        padded = mine + [prompts[-1]] * (per - len(mine))
        out = self.generator.generate(padded, seed=seed + 1_000_003 * rank(), **kwargs)[:len(mine)]
        return [group for part in gather_objects(out) for group in part]


def merge_logs(logs: list[dict]) -> dict:
    """Every rank's per-micro-batch logs merged: plain values averaged; (sum, count) pairs summed
    over all micro-batches of all ranks -> sum / count (None: no such token)."""
    logs = [x for part in gather_objects(logs) for x in part]
    merged = {}
    for key in logs[0]:
        vals = [entry[key] for entry in logs]
        if isinstance(vals[0], tuple):
            total, count = map(sum, zip(*vals))
            merged[key] = total / count if count else None
        else:
            merged[key] = float(np.mean(vals))
    return merged
