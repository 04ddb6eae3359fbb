"""Rollout engines behind one interface (token ids in; token ids, text, finish reason out):
transformers `generate` and a colocated vLLM engine with live weight push.

Infrastructure only (the science is in the experiments, common.py and the worlds)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

import torch

from infra.hub import SetupError
from infra import parallel


@dataclass
class Sample:
    token_ids: list[int]  # generated ids, the EOS included when the model stopped
    text: str  # decoded without special tokens
    finish_reason: str  # "stop" (EOS) or "length" (hit max_tokens)
    logprobs: list[float] | None = None  # the rollout engine's log-prob of each token (vLLM only)


class HFGenerator:
    """transformers `generate` (CPU or GPU) over left-padded batches. It samples from the trainer's
    own module, so its weights are always current (`sleep` and `load_weights` do nothing)."""

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_tokens: int = 256,
        seed: int = 0,
    ) -> list[list[Sample]]:
        from transformers import GenerationConfig

        torch.manual_seed(seed)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        config = GenerationConfig(
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None,
            top_k=top_k if temperature > 0 else None,
            max_new_tokens=max_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        flat = [p for p in prompts for _ in range(n)]
        out: list[Sample] = []
        device = next(self.model.parameters()).device
        for i in range(0, len(flat), self.batch_size):
            input_ids, attention_mask = left_pad(flat[i:i + self.batch_size], pad)
            # synced_gpus: a sharded (FSDP) model needs every rank in every forward until all
            # have stopped
            seqs = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                synced_gpus=parallel.world_size() > 1,
            )[:, input_ids.shape[1] :].tolist()
            for ids in seqs:
                stop = eos in ids
                ids = ids[:ids.index(eos) + 1] if stop else ids
                out.append(
                    Sample(
                        ids,
                        self.tokenizer.decode(ids, skip_special_tokens=True),
                        "stop" if stop else "length",
                    )
                )
        return [out[j * n:(j + 1) * n] for j in range(len(prompts))]

    def sleep(self) -> None:
        pass

    def load_weights(self, named_tensors) -> None:
        pass


VLLM_VERSION = (
    "0.32.0"  # the vLLM whose API `push_weights` is written against (requirements-gpu.txt)
)


def check_vllm(live: bool) -> None:
    """Raise SetupError naming the fix unless vLLM can run here: CUDA, vllm installed and, for a
    live engine (weights pushed during training), exactly VLLM_VERSION."""
    if not torch.cuda.is_available():
        raise SetupError("--backend vllm needs a CUDA machine; use --backend hf on this one")
    if importlib.util.find_spec("vllm") is None:
        raise SetupError("--backend vllm needs vllm: pip install -r requirements-gpu.txt")
    installed = importlib.metadata.version("vllm")
    if live and installed.split("+")[0] != VLLM_VERSION:
        raise SetupError(
            f"vllm {installed} is installed, but the live weight push "
            "(infra.rollout.push_weights) is written "
            f"for vllm=={VLLM_VERSION}: pip install vllm=={VLLM_VERSION} (requirements-gpu.txt)"
        )


def push_weights(llm, named_tensors) -> None:
    """Load (HF name, tensor) pairs in place into a colocated engine's model: the ONE place that
    depends on vLLM internals. `LLM.collective_rpc` runs the function on each worker (here the
    in-process one, so tensors pass by reference, never through disk); the model's own
    `load_weights` maps HF names onto vLLM's fused layers (qkv_proj, gate_up_proj). Written
    against vllm==VLLM_VERSION; check_vllm(live=True) refuses any other version."""
    llm.collective_rpc(_load_on_worker, args=(named_tensors,))


def _load_on_worker(worker, named_tensors) -> None:
    worker.model_runner.get_model().load_weights(weights=named_tensors)


class VLLMGenerator:
    """vLLM engine (CUDA only, imported lazily). With `live=True` it is colocated with the trainer
    in this process for on-policy training: sleep mode frees its GPU memory (weights to CPU, KV
    cache dropped) while the trainer works, and `load_weights` pushes the trainer's updated weights
    into it after each update (never a reload from disk), then resets the prefix cache so no cached
    KV from the old weights is reused. Under torchrun every rank runs its own engine."""

    def __init__(
        self,
        model_path: str,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        live: bool = False,
        **engine_kwargs,
    ):
        check_vllm(live)
        if (
            live
        ):  # in-process engine core: the worker (and the model push_weights writes into) lives here
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM  # lazy: importing any project module must work without vllm

        if (
            parallel.world_size() > 1
        ):  # one engine per torchrun rank, joined to the running process group
            engine_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        self.llm = LLM(
            model=model_path,
            seed=seed + parallel.rank(),
            dtype="bfloat16",
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=live,
            **engine_kwargs,
        )
        self.asleep = False

    def generate(
        self,
        prompts: list[list[int]],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_tokens: int = 256,
        seed: int = 0,
    ) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k if top_k > 0 else -1,
            max_tokens=max_tokens,
            seed=seed,
            skip_special_tokens=True,
            logprobs=0,
        )
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        return [
            [
                Sample(
                    list(c.token_ids),
                    c.text,
                    "length" if c.finish_reason == "length" else "stop",
                    [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
                    if c.logprobs
                    else None,
                )
                for c in o.outputs
            ]
            for o in outs
        ]

    def sleep(self) -> None:
        """Level 1: weights offloaded to CPU, KV cache dropped, until load_weights or generate."""
        self.llm.sleep(level=1)
        self.asleep = True

    def load_weights(self, named_tensors) -> None:
        """Push the trainer's weights: wake the weights only, load in place, then allocate the KV
        cache (after the trainer's cached blocks are released) and reset the prefix cache."""
        torch.cuda.empty_cache()
        self.llm.wake_up(tags=["weights"])
        push_weights(self.llm, named_tensors)
        self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()
        self.asleep = False


def make_generator(
    model,
    tokenizer,
    backend: str = "auto",
    model_path: str | None = None,
    seed: int = 0,
    live: bool = False,
    gpu_memory_utilization: float = 0.5,
):
    """`auto` = vLLM when CUDA and vllm are present and the model has a path, else transformers.
    `live`: the engine follows a model being trained (sleep mode and weight pushes)."""
    if backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"unknown generation backend {backend!r}: use auto, hf or vllm")
    has_vllm = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
    if backend == "vllm":
        check_vllm(live)
        if not model_path:
            raise SetupError(
                "--backend vllm loads the model from a directory or hub id; this model has none "
                "(tiny-random is built in memory): use --backend hf"
            )
    if backend == "vllm" or backend == "auto" and has_vllm and model_path:
        return VLLMGenerator(
            model_path, seed=seed, live=live, gpu_memory_utilization=gpu_memory_utilization
        )
    return HFGenerator(model, tokenizer)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])  # (B, T)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])  # (B, T)
    return ids, mask
