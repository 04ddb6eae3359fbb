"""Benchmark exp02's update step and generation: tokens/s and model FLOPs utilisation (MFU).

The model is built from a preset's architecture with random weights (no download); the update
is exp02's own `update()` (one mini-batch: forward + backward, pi_old from that forward, and the
optimizer step; SDPO adds the teacher's forward) on a synthetic batch of fixed-length sequences
(distinct prompts: no shared-prefix forward).

    python benchmark_training.py --preset tiny-random --device cpu --threads 1 --peak-tflops 0.0784  # anywhere
    python benchmark_training.py --preset qwen3-1.7b --batch 8 --prompt-len 512 --response-len 7680  # one GPU, 8k tokens
    python benchmark_training.py --preset qwen3-8b --layers 2 ...    # the real width and vocabulary, fewer layers
    python benchmark_training.py loss-head --tokens 20480 --vocab 151936   # peak memory of the chunked loss head

MFU = model FLOPs / time / peak FLOPs, with model FLOPs per token (PaLM, appendix B):
forward 2*N + 4*L*d_attn*T, forward + backward 6*N + 12*L*d_attn*T, where N counts the matmul
parameters (the input embedding is a lookup; a tied head counts once), L layers, d_attn =
heads * head_dim, T the sequence length. Activation recomputation is not counted (that would be
hardware FLOPs). Writes JSON to results/bench/.
"""
import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

import common
import exp02_onpolicy_grpo_sdpo as exp02
from infra import loss_head, parallel, rollout, run_dirs

# Architectures of the math presets (their config.json on the hub; random weights are built from these).
ARCH = {
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                     tie_word_embeddings=False, max_position_embeddings=40960)),
    "qwen3-1.7b": ("Qwen3Config", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                       tie_word_embeddings=True, max_position_embeddings=40960)),
    "deepseek-r1-distill-qwen-7b": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                                        num_attention_heads=28, num_key_value_heads=4,
                                                        vocab_size=152064, tie_word_embeddings=False,
                                                        max_position_embeddings=131072)),
    # Olmo 3 7B: the Olmo3Config defaults and the Olmo-3 vocabulary (3 of 4 layers sliding-window 4096).
    "olmo3-7b-instruct": ("Olmo3Config", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                              num_attention_heads=32, num_key_value_heads=32, vocab_size=100278,
                                              tie_word_embeddings=False, max_position_embeddings=65536)),
}
ARCH["qwen3-8b-nothink"] = ARCH["qwen3-8b"]
# The tests' tiny Qwen3 (tests/tiny.py): byte-level vocabulary, 2 layers of 128.
ARCH["tiny-random"] = ("Qwen3Config", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=4, head_dim=32, vocab_size=262,
                                           tie_word_embeddings=True, max_position_embeddings=4096))
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16 tensor-core peak per GPU


def build_model(preset: str, layers: int | None, device: str):
    """(model fp32, pad id, eos id) with random weights; tiny-random and toy load as exp02 does."""
    if preset not in ARCH:
        model, tokenizer, loaded = common.load_model(preset, device=device, dtype=torch.float32)
        if exp02.pick_world(preset).ACTIVATION_CHECKPOINTING:  # as exp02 trains this world
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, tokenizer.pad_token_id, tokenizer.eos_token_id
    import transformers

    name, kwargs = ARCH[preset]
    kwargs = dict(kwargs, num_hidden_layers=layers or kwargs["num_hidden_layers"])
    config = getattr(transformers, name)(**kwargs, pad_token_id=0, eos_token_id=kwargs["vocab_size"] - 1)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as exp02 trains the math world
    return model.eval(), 0, kwargs["vocab_size"] - 1


def flops_per_token(model, seq_len: int, train: bool) -> float:
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    n += model.get_output_embeddings().weight.numel() if c.tie_word_embeddings else 0
    d_attn = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    return (6 if train else 2) * n + (12 if train else 4) * c.num_hidden_layers * d_attn * seq_len


def synthetic_data(args, vocab: int) -> dict:
    """B fixed-length sequences in groups of n, as exp02's collect() returns them; half the
    rollouts succeed, so every SDPO sample has a peer demonstration."""
    g = torch.Generator().manual_seed(0)
    rand = lambda k: torch.randint(1, vocab - 1, (k,), generator=g).tolist()  # noqa: E731
    seqs = [(rand(args.prompt_len), rand(args.response_len)) for _ in range(args.batch)]
    return {"seqs": seqs, "teacher_seqs": [(rand(args.teacher_prompt_len), r) for _, r in seqs],
            "flat": [rollout.Sample(r, "", "length") for _, r in seqs],
            "rewards": torch.tensor([float(i % 2) for i in range(args.batch)]), "has_demo": torch.ones(args.batch)}


def rollouts_of(data: dict) -> "exp02.Rollouts":
    """The synthetic batch as exp02.update takes it."""
    return exp02.Rollouts(samples=data["flat"], rewards=data["rewards"], grader=common.GradeReport(correct=[]),
                          seqs=data["seqs"], teacher_seqs=data["teacher_seqs"], has_demo=data["has_demo"])


def update_settings(args) -> "exp02.Settings":
    """exp02's settings for one update of the synthetic batch (one mini-batch)."""
    return exp02.Settings(model=args.preset, prompts_per_step=args.batch // args.rollouts,
                          rollouts=args.rollouts, mini_batches=1, micro_batch_size=args.micro_batch,
                          topk=args.topk, logit_chunk=args.logit_chunk, lr=1e-6)


def bench_update(args, method, student, teacher, data, pad, device) -> dict:
    s = update_settings(args)
    opt = torch.optim.AdamW(student.parameters(), lr=s.lr)
    epistemic = torch.zeros(student.get_output_embeddings().weight.shape[0], dtype=torch.bool, device=device)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        exp02.update(dataclasses.replace(s, method=method), student=student, teacher=teacher, opt=opt,
                     rollouts=rollouts_of(data), pad_id=pad, epistemic_ids=epistemic, step=i + 1)
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = sum(times[args.warmup:]) / args.steps
    seq = args.prompt_len + args.response_len
    tokens = args.batch * seq
    flops = tokens * flops_per_token(student, seq, train=True)  # one mini-batch: pi_old = its own forward
    if method == "sdpo":
        t_seq = args.teacher_prompt_len + args.response_len
        flops += args.batch * t_seq * flops_per_token(student, t_seq, train=False)
    return {"step_s": seconds, "tokens_per_s": tokens / seconds, "model_flops": flops,
            "mfu": flops / seconds / (args.peak_tflops * 1e12) if args.peak_tflops else None}


def bench_generation(args, model, pad, eos, device) -> dict:
    class NoText:  # random weights: the text is meaningless, only token counts matter
        pad_token_id, eos_token_id = pad, eos

        def decode(self, ids, skip_special_tokens=True):
            return ""

    gen = rollout.HFGenerator(model, NoText())
    g = torch.Generator().manual_seed(1)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = [torch.randint(1, vocab - 1, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch // args.rollouts)]
    sync(device)
    t0 = time.perf_counter()
    out = gen.generate(prompts, n=args.rollouts, temperature=1.0, max_tokens=args.response_len, seed=0)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(x.token_ids) for group in out for x in group)
    return {"backend": "hf", "generated_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def bench_trl(args) -> dict:
    """TRL's GRPOTrainer for the same steps, model and batch, when trl is installed (not run in
    this repository so far). Its step includes generation: compare it with generation + update."""
    if importlib.util.find_spec("trl") is None:
        return {"skipped": "trl is not installed (pip install trl to compare)"}
    if args.preset in ARCH:
        return {"skipped": "the TRL comparison needs a tokenizer: use --preset toy"}
    import tempfile

    import datasets
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer, _ = common.load_model(args.preset, device=args.device, dtype=torch.float32)
    prompts = datasets.Dataset.from_dict({"prompt": ["x" * args.prompt_len] * (args.batch // args.rollouts)})
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=args.batch, num_generations=args.rollouts,
                            max_completion_length=args.response_len, max_steps=args.warmup + args.steps,
                            report_to=[], learning_rate=1e-6, use_cpu=args.device == "cpu")
        trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=config, train_dataset=prompts, processing_class=tokenizer)
        t0 = time.perf_counter()
        trainer.train()
    return {"seconds_per_step_incl_generation": (time.perf_counter() - t0) / (args.warmup + args.steps)}


def loss_head(args) -> dict:
    """Peak memory of exp02's chunked loss head for N response tokens and a V-word vocabulary:
    what autograd keeps (exact, from saved-tensor hooks) and the process's peak RSS increase
    during forward + backward (CPU), at a small hidden size with the real N and V."""
    torch.set_num_threads(args.threads)
    n, v, h, k = args.tokens, args.vocab, args.hidden, args.topk
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (0.02 * torch.randn(v, h)).requires_grad_()
    targets = torch.randint(0, v, (n,))
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [torch.utils.checkpoint.checkpoint(loss_head._chunk_stats, hidden[a:a + args.logit_chunk], weight,
                                                  targets[a:a + args.logit_chunk], k, None, use_reentrant=False)
                for a in range(0, n, args.logit_chunk)]
        loss = torch.cat([o[0] for o in outs]).sum() + torch.cat([o[1] for o in outs]).exp().sum()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    chunk_vocab_fp32 = min(args.logit_chunk, n) * v * 4
    return {"tokens": n, "vocab": v, "hidden_size": h, "topk": k, "chunk": args.logit_chunk,
            "kept_for_backward_bytes": sum(kept.values()),
            "kept_beyond_weight_and_hidden_bytes": sum(kept.values()) - v * h * 4 - n * h * 4,
            "peak_rss_increase_bytes": peak, "chunk_x_vocab_fp32_bytes": chunk_vocab_fp32,
            "peak_in_chunk_x_vocab_buffers": peak / chunk_vocab_fp32,
            "unchunked_logits_fp32_bytes": n * v * 4, "seconds": time.perf_counter() - t0}


def loss_head_cuda_peak(tokens: int, vocab: int, hidden: int, topk: int, chunk: int) -> dict:
    """CUDA peak memory of exp02's chunked loss head (forward + backward, fp32) beyond its inputs,
    against the README's bound: 6 fp32 (chunk x V) buffers + the head's and the hidden states'
    gradients."""
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device="cuda", requires_grad=True)
    weight = (0.02 * torch.randn(vocab, hidden, device="cuda")).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    outs = [torch.utils.checkpoint.checkpoint(loss_head._chunk_stats, h[a:a + chunk], weight,
                                              targets[a:a + chunk], topk, None, use_reentrant=False)
            for a in range(0, tokens, chunk)]
    (torch.cat([o[0] for o in outs]).sum() + torch.cat([o[1] for o in outs]).exp().sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    bound = 6 * min(chunk, tokens) * vocab * 4 + 2 * vocab * hidden * 4 + tokens * hidden * 4
    return {"tokens": tokens, "vocab": vocab, "hidden_size": hidden, "topk": topk, "chunk": chunk,
            "peak_bytes": peak, "bound_bytes": bound, "within_bound": peak < bound,
            "unchunked_logits_fp32_bytes": tokens * vocab * 4, "seconds": time.perf_counter() - t0}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", nargs="?", default="train", choices=["train", "loss-head"])
    p.add_argument("--preset", default="tiny-random", help=f"tiny-random | toy | {' | '.join(ARCH)}")
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers (random presets)")
    p.add_argument("--device", default=common.default_device())
    p.add_argument("--batch", type=int, default=8, help="sequences per update (B x n)")
    p.add_argument("--rollouts", type=int, default=4, help="n, sequences per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=192)
    p.add_argument("--teacher-prompt-len", type=int, default=None, help="default: prompt + response (a demonstration)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--logit-chunk", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOPs per device (default: table by GPU name)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=20480, help="loss-head: response tokens N")
    p.add_argument("--vocab", type=int, default=151936, help="loss-head: vocabulary V")
    p.add_argument("--hidden", type=int, default=64, help="loss-head: hidden size (small: memory is about N and V)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    parallel.cpu_threads(args.threads)
    env = run_dirs.environment_info()
    if args.mode == "loss-head":
        result = {"loss_head": loss_head(args)}
        name = f"loss_head_N{args.tokens}_V{args.vocab}_chunk{args.logit_chunk}"
    else:
        args.teacher_prompt_len = args.teacher_prompt_len or args.prompt_len + args.response_len
        if args.peak_tflops is None and args.device.startswith("cuda"):
            gpu = torch.cuda.get_device_name()
            args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
        student, pad, eos = build_model(args.preset, args.layers, args.device)
        vocab = student.get_output_embeddings().weight.shape[0]
        args.topk = min(args.topk, vocab)
        teacher = copy.deepcopy(student).to(torch.bfloat16 if args.device.startswith("cuda") else torch.float32).eval()
        data = synthetic_data(args, vocab)
        result = {"grpo_update": bench_update(args, "grpo", student, None, data, pad, args.device),
                  "sdpo_update": bench_update(args, "sdpo", student, teacher, data, pad, args.device),
                  "generation": bench_generation(args, student, pad, eos, args.device), "trl_grpo": bench_trl(args),
                  "parameters": sum(p.numel() for p in student.parameters())}
        name = f"training_{args.preset}{f'_L{args.layers}' if args.layers else ''}_{args.device.split(':')[0]}"
    result = {"settings": vars(args), "machine": {"device": env["cuda"] or f"CPU, {os.cpu_count()} cores",
                                                  "platform": env["platform"]}, "packages": env["packages"], **result}
    out = Path(args.out or f"results/bench/{name}.json")
    common.write_json_atomic(out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("settings", "packages")}, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
