"""What every experiment shares, and nothing else: model presets and loading, the chat prompt and
the teacher's message, the thinking split, the epistemic counter, avg@k / pass@k, evaluation,
seeding, atomic writes and reading a run's metrics.jsonl.

Both worlds (toy_world.py, math_world.py) go through these functions; infrastructure (process
groups, rollout engines, the grader pool, checkpoints, the loss head, run files, tables) lives
in infra/.
"""
from __future__ import annotations

import importlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from infra import progress
from infra.hub import SetupError, hub_offline, hub_unreachable, offline_message

ROOT = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# Model presets: short name -> settings. Evaluation sampling is the paper's (0.6/0.95 with
# thinking, 0.7/0.8 without); max_new_tokens is the release's 38,912 for math models.
# ---------------------------------------------------------------------------------------------
_THINK = dict(world="math", thinking=True, think_in_prompt=False, temperature=0.6, top_p=0.95,
              max_new_tokens=38912)
_NOTHINK = dict(_THINK, thinking=False, temperature=0.7, top_p=0.8)
PRESETS = {
    "qwen3-8b": dict(_THINK, hub_id="Qwen/Qwen3-8B"),
    "qwen3-8b-nothink": dict(_NOTHINK, hub_id="Qwen/Qwen3-8B"),
    "qwen3-1.7b": dict(_THINK, hub_id="Qwen/Qwen3-1.7B"),
    # Its chat template ends the prompt with "<think>\n": responses only contain the closing tag.
    "deepseek-r1-distill-qwen-7b": dict(_THINK, hub_id="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
                                        think_in_prompt=True),
    "olmo3-7b-instruct": dict(_NOTHINK, hub_id="allenai/Olmo-3-7B-Instruct"),
    # The embedded toy world: greedy evaluation (deterministic and cheap), short responses.
    "toy": dict(world="toy", hub_id=str(ROOT / "toy_model"), thinking=True, think_in_prompt=False,
                temperature=0.0, top_p=1.0, max_new_tokens=64,
                if_missing="`python toy_world.py build` (or `git checkout toy_model`) makes it"),
}


def resolve_preset(name: str) -> dict:
    """A preset by short name, or a generic entry for a local path or a hub id `org/name`."""
    if name in PRESETS:
        return dict(PRESETS[name], name=name)
    path = Path(name) / "config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    if config.get("toy_world"):  # e.g. a trained toy checkpoint
        return dict(PRESETS["toy"], hub_id=name, name=name)
    if Path(name).exists() or name.count("/") == 1 and not name.startswith(("/", ".")):
        # think_in_prompt None: detected from the chat template; a saved model may set preset fields
        return dict(_THINK, hub_id=name, name=name, think_in_prompt=None,
                    **config.get("preset", {}))
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(PRESETS)}, a local model "
                     "directory or a Hugging Face hub id such as Qwen/Qwen3-8B")


def pick_world(model: str):
    """The world module a model lives in (toy_world or math_world), chosen once per run."""
    return importlib.import_module(f"{resolve_preset(model)['world']}_world")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name: str, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer, preset). bf16 on GPU, fp32 on CPU unless `dtype` says otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    preset = resolve_preset(name)
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    path = preset["hub_id"]
    if preset.get("if_missing") and not Path(path).exists():  # a model shipped in the repository
        raise FileNotFoundError(f"the model is missing at {path}: {preset['if_missing']}")
    why = None if Path(path).exists() or hub_offline() else hub_unreachable(path, "model")
    try:  # hub unreachable: the local cache only (no retries), else the usual lookup
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=why is not None)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     local_files_only=why is not None)
    except OSError as e:
        error = f"{why}; not in the local cache: {e}" if why else e
        raise SetupError(offline_message(path, "model", error)) from None
    if preset["think_in_prompt"] is None:
        preset["think_in_prompt"] = opens_think_in_prompt(tokenizer)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, preset


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
    """The release's teacher context: message + solution + instruction (docs/PROTOCOL.md §3)."""
    return (f"{user_message}\nCorrect solution:\n\n{solution}\n\n"
            "Correctly solve the original question.")


# ---------------------------------------------------------------------------------------------
# The epistemic counter (docs/PROTOCOL.md, "Epistemic verbalization")
# ---------------------------------------------------------------------------------------------
EPISTEMIC_WORDS = ("wait", "hmm", "perhaps", "maybe", "actually", "alternatively", "seems", "might",
                   "likely", "check")
# Word mode: whole words, case-insensitive. "hmm" also matches "hmmm", "Hmmmm," (hm{2,}), as the
# model spells its hesitation with any number of m's; every other word must match exactly, so
# "checking", "checks", "unlikely", "await" do NOT count in word mode (they do in paper mode).
_WORD_RES = {w: re.compile(r"\bhm{2,}\b" if w == "hmm" else rf"\b{w}\b", re.IGNORECASE)
             for w in EPISTEMIC_WORDS}
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


def epistemic_token_ids(tokenizer, rows: int) -> torch.Tensor:
    """(rows,) bool: the id's text holds an epistemic word. rows = the output head's size (Qwen3:
    151,936), which may exceed len(tokenizer) (151,669): ids without a token are not epistemic."""
    n = min(rows, len(tokenizer))
    return torch.tensor([any(w in tokenizer.decode([i]).lower() for w in EPISTEMIC_WORDS)
                         for i in range(n)] + [False] * (rows - n))


def epistemic_total(counts: dict[str, int]) -> int:
    """epistemic_count = sum over the 10 words of count_w."""
    return int(sum(counts.values()))


def per_1k_tokens(count: float, n_tokens: int) -> float:
    """Rate per 1,000 tokens: 1000 * count / n_tokens (0 tokens -> 0.0: no rate)."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    return 0.0 if n_tokens == 0 else 1000.0 * count / n_tokens


# ---- thinking / final answer ----

def split_thinking(response: str, think_in_prompt: bool = False) -> tuple[str, str | None]:
    """A response -> (thinking, final_answer); final_answer None = the thinking never finished.

    "</think>" present -> thinking = text before the FIRST "</think>" (leading "<think>" dropped),
                          answer = text after it.
    no "</think>"      -> if the response has "<think>" or think_in_prompt (DeepSeek-R1 opens
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


_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)  # unclosed: to the end


def strip_thinking(response: str, think_in_prompt: bool = False) -> str:
    """s\\think: remove every <think>...</think> block (an unclosed one to the end of the text) and,
    when the template opens <think> in the prompt, everything up to and including the first
    </think> (no </think> at all -> the whole response was thinking -> "")."""
    if think_in_prompt:
        response = response.split("</think>", 1)[1] if "</think>" in response else ""
    return _THINK_BLOCK.sub("", response).strip()


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


def response_metrics(texts: list[str], n_tokens: list[int], finish_reasons: list[str],
                     tokenizer=None,
                     think_in_prompt: bool = False) -> dict:
    """Length, truncation and epistemic counts (paper mode per word, word mode total), as means
    per response; thinking length needs the tokenizer."""
    n = max(len(texts), 1)
    counts = [count_epistemic(t, "paper") for t in texts]
    m = {"response_length": sum(n_tokens) / n,
         "truncation_rate": sum(f == "length" for f in finish_reasons) / n}
    if tokenizer is not None:
        thinking = [split_thinking(t, think_in_prompt)[0] for t in texts]
        m["thinking_length"] = sum(len(tokenizer(x, add_special_tokens=False).input_ids)
                                   for x in thinking) / n
    for w in EPISTEMIC_WORDS:
        m[f"epistemic/{w}"] = sum(c[w] for c in counts) / n
    m["epistemic/total"] = sum(map(epistemic_total, counts)) / n
    total = sum(map(epistemic_total, counts))
    m["epistemic/total_per_1k_tokens"] = per_1k_tokens(total, sum(n_tokens))
    m["epistemic_word/total"] = sum(epistemic_total(count_epistemic(t, "word")) for t in texts) / n
    return m


def evaluate(generator, tokenizer, preset: dict, problems: list[dict], k: int, temperature: float,
             top_p: float, max_tokens: int, seed: int = 0, grade=None,
             grader_timeout_s: float = 5.0, world=None) -> tuple[dict, list[dict]]:
    """avg@k, pass@k, lengths, truncation and epistemic counts on one problem set, graded by the
    world's `grade` -> (metrics, samples). With a `world`: the share of each of its
    FAILURE_CLASSES (`failure/<class>`, summing to 1) and the mean count of its WORDS_COUNTED."""
    prompts = [prompt_ids(tokenizer, p["prompt"], preset["thinking"]) for p in problems]
    samples = generator.generate(prompts, n=k, temperature=temperature, top_p=top_p,
                                 max_tokens=max_tokens, seed=seed)
    flat = [s for group in samples for s in group]
    golds = [p["gold"] for p in problems for _ in range(k)]
    report = grade([s.text for s in flat], golds, preset["think_in_prompt"],
                   timeout_s=grader_timeout_s)
    correct = np.array(report.correct).reshape(len(problems), k)  # (P, k)
    metrics = {f"avg@{k}": avg_at_k(correct),
               **({f"pass@{k}": mean_pass_at_k(correct, k)} if k > 1 else {}),  # pass@1 = avg@1
               **response_metrics([s.text for s in flat], [len(s.token_ids) for s in flat],
                                  [s.finish_reason for s in flat], tokenizer,
                                  preset["think_in_prompt"]),
               "grader/timeouts": report.timeouts, "grader/errors": report.errors}
    rows = [{"problem": i // k, "gold": g, "response": s.text, "correct": bool(c),
             "finish_reason": s.finish_reason}
            for i, (s, g, c) in enumerate(zip(flat, golds, report.correct))]
    if world is not None:
        for r in rows:
            r["failure"] = world.failure_class(problems[r["problem"]], r["response"],
                                               r["finish_reason"], r["correct"])
        metrics.update(failure_shares([r["failure"] for r in rows], world.FAILURE_CLASSES))
        metrics.update({f"words/{w}": np.mean([r["response"].split().count(w) for r in rows])
                        for w in world.WORDS_COUNTED})
    return metrics, rows


def failure_shares(classes: list[str], names: tuple[str, ...]) -> dict:
    """The share of each failure class (every name present, zeros included; they sum to 1)."""
    unknown = set(classes) - set(names)
    if unknown:
        raise ValueError(f"failure classes {sorted(unknown)} are not among {names}")
    return {f"failure/{c}": classes.count(c) / max(len(classes), 1) for c in names}


@torch.no_grad()
def next_token_prob(model, tokenizer, preset: dict, items: list[tuple[str, str]], word: str,
                    batch: int = 64) -> float:
    """Mean over (message, response prefix) of P(word | chat prompt of message + prefix): the
    probe of one decision (toy: P(`maybe`) at the first choice). Right-padded, read at each
    row's last real position (causal attention: the padding after it changes nothing)."""
    target = tokenizer.convert_tokens_to_ids(word)
    device = next(model.parameters()).device
    seqs = [prompt_ids(tokenizer, m, preset["thinking"])
            + tokenizer(p, add_special_tokens=False).input_ids for m, p in items]
    probs = []
    for a in range(0, len(seqs), batch):
        part = seqs[a:a + batch]
        ids = torch.full((len(part), max(map(len, part))), tokenizer.pad_token_id)  # (b, T)
        for i, x in enumerate(part):
            ids[i, :len(x)] = torch.tensor(x)
        mask = (torch.arange(ids.shape[1]) < torch.tensor([len(x) for x in part])[:, None]).long()
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (b,T,V)
        last = logits[torch.arange(len(part)), mask.sum(1).to(device) - 1].float()  # (b, V)
        probs.append(last.softmax(-1)[:, target])
    return torch.cat(probs).mean().item() if probs else float("nan")


def evaluate_sets(generator, tokenizer, preset: dict, sets: dict, sampling: tuple, seed: int, grade,
                  prefix: str = "eval", world=None) -> tuple[dict, dict]:
    """common.evaluate on every set -> (flat metrics `<prefix>/<set>/<metric>`, the first 50
    samples of each set); `sampling` = the world's (k, temperature, top_p, max_tokens)."""
    metrics, samples = {}, {}
    for name, problems in progress.bar(sets.items(), prefix, len(sets)):
        m, rows = evaluate(generator, tokenizer, preset, problems, *sampling, seed, grade=grade,
                           world=world)
        metrics.update({f"{prefix}/{name}/{key}": v for key, v in m.items()})
        samples[name] = rows[:50]
    return metrics, samples


def batch_indices(n_problems: int, batch: int, step: int, seed: int) -> list[int]:
    """Problems of a step: positions (step-1)*B .. step*B-1 of an endless sequence of seeded
    shuffles of the training set. A pure function of the step: a resumed run sees the same data."""
    start, orders = (step - 1) * batch, {}
    for pos in range(start, start + batch):
        epoch = pos // n_problems
        if epoch not in orders:
            orders[epoch] = random.Random(f"{seed}-{epoch}").sample(range(n_problems), n_problems)
    return [orders[pos // n_problems][pos % n_problems] for pos in range(start, start + batch)]


# ---------------------------------------------------------------------------------------------
# Seeds, atomic writes, metrics.jsonl read back (infra/run_dirs.py writes run directories)
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
