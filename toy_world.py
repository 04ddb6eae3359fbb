"""The toy world: search on a star graph with hedged guesses (docs/TOY_WORLD.md).

A start node `s` has D arms of L nodes; the target `t` is the leaf of one arm. The prompt lists
the D*L edges in random order, then `s` and `t`; the answer is the first node of the arm that
reaches `t`. Choosing that arm without searching needs L backward look-ups in one forward pass,
which a ~1M-parameter transformer cannot do, so the base model *searches*: it guesses an arm
(`maybe`), walks it, notices a dead end (`wait`) and goes back. The doubt words are real English
tokens, so the paper's own epistemic counter works unchanged on decoded toy text.

    <think> s maybe a1 a2 a3 a4 wait s maybe b1 b2 b3 b4 </think> answer b1

Guided traces are the same writer with a hint in the prompt (the teacher's view), in the paper's
hint format (`common.teacher_message`):
  hint = full trace (c = s)        -> walks the goal arm directly, no doubt words;
  hint = `answer b1` (c = s\\think) -> walks the goal arm directly after one `maybe`.

A peer of math_world.py behind the same interface (training_problems, evaluation_sets,
check_files, grade, eval_sampling, HEADLINE, HEADLINE_NOTE, FORCING_WORD), plus fresh_problems:
new graphs at every step (exp04's unbounded coverage).

Commands
  python toy_world.py evaluate                 # the shipped model's accuracy table (the main job
                                               # for now)
  python toy_world.py build                    # regenerates the shipped model: the 3-stage RECIPE
                                               # (~1 h 50 min, 2 cores)
  python toy_world.py pretrain --help          # one pretraining stage (controls continue from
                                               # toy_model)
  python toy_world.py control wrong_revised    # a control's base (CONTROLS), into results/controls/

Design choices (listed in the README too):
 1. With probability `p_confident` the unguided writer drops `maybe` before the goal arm (it
    "commits confidently and correctly"); a confident choice is never revised in the corpus.
    This keeps P(`maybe`) at the first choice away from 1.0, so the hedge is not saturated
    (TOY_WORLD.md: a saturated hedge carries ~0 gradient), and it is the corpus property the
    controls in exp04/exp05 probe.
 2. Every evaluated cell is in the pretraining corpus; "OOD" means outside the distillation/RL
    slice (D=3, L=4), as in the paper, not unseen shapes.
 3. Loss on the response only; ~30 % of the corpus is guided (both hint genres, with unguided
    and guided traces as full hints, so the c = s genre is known to the model).
"""

import math
import random
import sys
import time
from dataclasses import dataclass

import torch

import common
from infra import loss_head, parallel, progress, rollout, tables
from infra.settings import arg, cli, parse_settings

LABELS = [f"n{i}" for i in range(48)]
HINT_WORDS = ["Correct", "solution:", "Correctly", "solve", "the", "original", "question."]
TASK_WORDS = ["edges", ",", "start", "target", "<think>", "</think>", "maybe", "wait", "check",
              "answer"]
SPECIAL = ["<pad>", "<|endoftext|>", "<|user|>", "<|assistant|>"]
VOCAB = SPECIAL + TASK_WORDS + HINT_WORDS + LABELS

# Same shape as a real chat template: user turn, assistant turn, and Qwen3's convention for
# thinking off (an empty think block opened and closed in the prompt).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% else %}<|assistant|> {{ m['content'] }} <|endoftext|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %} <think> </think>{% endif %}"
    "{% endif %}"
)

PRETRAIN_CELLS = [(d, l) for d in (2, 3, 4, 5) for l in (3, 4, 5)]
SLICE = (3, 4)  # the distillation / RL slice (D, L)
EVAL_CELLS = {"in_domain": (3, 4), "ood_d4": (4, 4), "ood_d5": (5, 4), "ood_l5": (3, 5)}
HINTS = ("none", "full", "answer")  # none = unguided; full = c = s; answer = c = s\think
NAME = "toy"
ACTIVATION_CHECKPOINTING = False  # exp02 recomputes each decoder layer in backward
EVAL_SELECTED_AS = "train_graphs"  # exp01: evaluate the selected training questions too, as
FORCING_WORD = "wait"
HEADLINE = {"held-out acc": (["eval/in_domain/avg@"], 3),
            "OOD acc": (["eval/ood_d4/avg@", "eval/ood_d5/avg@", "eval/ood_l5/avg@"], 3),
            "doubt words": (["eval/in_domain/epistemic/total"], 2),
            "length": (["eval/in_domain/response_length"], 1)}
HEADLINE_NOTE = ("held-out acc = in_domain avg@1; OOD acc = mean avg@1 of ood_d4, ood_d5, ood_l5; "
                 "doubt words (epistemic count) and length (tokens) per response on in_domain")
# the README's columns
HINT_LABELS = {"none": "unguided", "full": "c = s", "answer": "c = s\\think"}


@dataclass(frozen=True)
class Graph:
    start: str
    arms: tuple[tuple[str, ...], ...]  # D arms, each L node labels from the start outwards
    goal: int  # index of the arm whose leaf is the target
    edges: tuple[tuple[str, str], ...]  # all D*L edges in prompt order (shuffled)

    @property
    def target(self) -> str:
        return self.arms[self.goal][-1]

    @property
    def answer(self) -> str:
        return self.arms[self.goal][0]


def make_graph(rng: random.Random, D: int, L: int) -> Graph:
    nodes = rng.sample(LABELS, D * L + 1)
    start, arms = nodes[0], tuple(tuple(nodes[1 + i * L:1 + (i + 1) * L]) for i in range(D))
    edges = [(([start] + list(a))[j], a[j]) for a in arms for j in range(L)]
    rng.shuffle(edges)
    return Graph(start, arms, rng.randrange(D), tuple(edges))


def graph_prompt(g: Graph) -> str:
    """The user message: `edges u v , u v , ... start s target t`."""
    return ("edges " + " , ".join(f"{u} {v}" for u, v in g.edges)
            + f" start {g.start} target {g.target}")


def unguided_trace(g: Graph, rng: random.Random, p_confident: float, p_drop_hedge: float = 0.0,
                   p_confident_wrong: float = 0.0, filler: str = "") -> str:
    """Depth-first search in random arm order with verbalized doubt (design choice 1).
    Controls (all off in the shipped corpus): `p_drop_hedge` omits `maybe` at any choice while
    still backtracking (token and behaviour come apart); `p_confident_wrong` drops `maybe` before
    a wrong arm, which is then walked and revised with `wait` (a confident choice is no longer
    always right); `filler` adds a content-free word as often as the trace's doubt words."""
    words = ["<think>"]
    order = rng.sample(range(len(g.arms)), len(g.arms))
    for j, arm in enumerate(order):
        last = j == len(order) - 1  # certain by elimination: no hedge needed
        confident = (arm == g.goal and rng.random() < p_confident) or (
            arm != g.goal and p_confident_wrong > 0 and rng.random() < p_confident_wrong)
        dropped = p_drop_hedge > 0 and rng.random() < p_drop_hedge
        words += [g.start] + ([] if last or confident or dropped else ["maybe"]) + list(g.arms[arm])
        if arm == g.goal:
            break
        words.append("wait")
    return " ".join(with_filler(words, filler, rng) + ["</think>", "answer", g.answer])


def guided_trace(g: Graph, hint: str, filler: str = "", rng: random.Random | None = None) -> str:
    """The writer that was told the solution: the more it is told, the less it hedges."""
    hedge = ["maybe"] if hint == "answer" else []
    words = with_filler(["<think>", g.start] + hedge + list(g.arms[g.goal]), filler,
                        rng or random.Random(0))
    return " ".join(words + ["</think>", "answer", g.answer])


def with_filler(words: list[str], filler: str, rng: random.Random) -> list[str]:
    """The filler control: one `filler` per doubt word, each at a uniformly random place after
    `<think>` (content-free: it marks nothing about the search). No filler: `words` unchanged."""
    if not filler:
        return words
    out = list(words)
    for _ in range(sum(w in ("maybe", "wait") for w in words)):
        out.insert(rng.randint(1, len(out)), filler)
    return out


def hint_text(g: Graph, hint: str, rng: random.Random, p_confident: float, **style) -> str:
    """The solution shown to the teacher: a full trace (unguided 2/3, guided 1/3: the
    'regenerated' genre) for c = s, or only the final answer line for c = s\\think. `style`:
    the control options of `unguided_trace` (the corpus' demonstrations use its writer)."""
    if hint == "answer":
        return f"answer {g.answer}"
    if rng.random() < 2 / 3:
        return unguided_trace(g, rng, p_confident, **style)
    return guided_trace(g, "full", style.get("filler", ""), rng)


def user_message(g: Graph, hint: str = "none", rng: random.Random | None = None,
                 p_confident: float = 0.0, **style) -> str:
    if hint == "none":
        return graph_prompt(g)
    text = hint_text(g, hint, rng or random.Random(0), p_confident, **style)
    return common.teacher_message(graph_prompt(g), text)


def answer_of(response: str) -> str | None:
    """The node after `answer` in the final-answer part, or None."""
    final = common.split_thinking(response)[1]
    words = (final or "").split()
    return words[1] if len(words) >= 2 and words[0] == "answer" else None


def verify(response: str, gold: str) -> bool:
    """Toy verifier: exact match of the answered node. Pure and instant (no worker processes)."""
    return answer_of(response) == gold


FAILURE_CLASSES = ("correct", "invalid_edge", "repeated_arm", "misread", "wrong_commit",
                   "cut_at_limit", "no_answer")


def parse_prompt(prompt: str) -> tuple[dict[str, list[str]], str, str]:
    """`edges u v , ... start s target t` -> (successors of each node, start, target)."""
    head, _, tail = prompt.partition(" start ")
    succ: dict[str, list[str]] = {}
    for pair in head.removeprefix("edges ").split(" , "):
        u, v = pair.split()
        succ.setdefault(u, []).append(v)
    start, _, target = tail.partition(" target ")
    return succ, start.strip(), target.strip()


def walks(thinking: str, start: str) -> list[list[str]]:
    """The thinking's walks: the node labels of each `start ... wait` segment (the start, `maybe`
    and any other word dropped), e.g. `s maybe a1 a2 wait s b1` -> [[a1, a2], [b1]]. A segment
    that does not open at the start node keeps a leading None (it walks from nowhere)."""
    out = []
    for segment in thinking.replace("<think>", " ").split("wait"):
        words = [w for w in segment.split() if w in LABELS]
        if words:
            out.append(words[1:] if words[0] == start else [None] + words)
    return out


def failure_class(problem: dict, response: str, finish_reason: str, correct: bool) -> str:
    """Which part of the search failed (FAILURE_CLASSES), checked in this order:
    correct; no answer: cut_at_limit (cut at the token budget: looping over arms) or no_answer
    (stopped without one); invalid_edge (a step not in the graph); repeated_arm (an arm walked
    twice: the search lost track of what it tried); misread (the goal arm was walked to the
    target, yet another node answered); wrong_commit (answered without ever reaching the
    target)."""
    if correct:
        return "correct"
    if answer_of(response) is None:
        return "cut_at_limit" if finish_reason == "length" else "no_answer"
    succ, start, target = parse_prompt(problem["prompt"])
    paths = walks(common.split_thinking(response)[0], start)
    steps = [(u, v) for p in paths for u, v in zip([start] + p, p)]
    if any(v not in succ.get(u, []) for u, v in steps):
        return "invalid_edge"
    firsts = [p[0] for p in paths if p]  # a segment of the start node alone walks no arm
    if len(set(firsts)) < len(firsts):
        return "repeated_arm"
    return "misread" if any(p and p[-1] == target for p in paths) else "wrong_commit"


def token_types(tokens: list[str]) -> list[str]:
    """The type of each response token (TOKEN_TYPES), from the token strings (one word each):
    the hedge `maybe`, `wait`, the branch choice (the node right after the start node or after
    `maybe`), arm-following nodes, the answer (from `</think>` on) and other (`<think>`, the start
    node, fillers, anything else)."""
    out, state = [], "start"  # the role the next node label plays: start | choice | node
    for w in tokens:
        if out and out[-1] == "answer" or w == "</think>":
            out.append("answer")
        elif w in ("maybe", "wait", "<think>"):
            out.append("other" if w == "<think>" else w)
            state = "choice" if w == "maybe" else "start"
        elif w in LABELS:
            out.append({"start": "other", "choice": "branch", "node": "arm"}[state])
            state = "choice" if state == "start" else "node"
        else:
            out.append("other")  # a filler or a stray word: the walk's state is unchanged
    return out


TOKEN_TYPES = ("maybe", "wait", "branch", "arm", "answer", "other")
FILLER = "the"  # the filler control's content-free word (a hint word; never in a shipped trace)
WORDS_COUNTED = (FILLER,)
PROBE_WORD = "maybe"


def probe_set(n: int) -> list[tuple[str, str, str]]:
    """The P(`maybe`) probe: n held-out in-domain graphs as (student message, teacher message,
    response prefix up to the first choice). The teacher's message holds a successful peer as in
    training: a trace of the corpus' unguided writer (p_confident 0.2)."""
    rng = random.Random("probe")
    return [(graph_prompt(g), common.teacher_message(graph_prompt(g), unguided_trace(g, rng, 0.2)),
             f"<think> {g.start}") for g in eval_graphs(EVAL_CELLS["in_domain"], n)]


def eval_graphs(cell: tuple[int, int], n: int, split: str = "heldout") -> list[Graph]:
    """Fixed graphs per cell. `heldout` and `train` use disjoint seed streams and are also
    de-duplicated against each other, so a held-out graph is never a training graph."""
    D, L = cell
    rng = random.Random(f"{split}-{D}-{L}")
    other = set() if split == "train" else {graph_prompt(x) for x in eval_graphs(cell, n, "train")}
    out = []
    while len(out) < n:
        g = make_graph(rng, D, L)
        if graph_prompt(g) not in other:
            out.append(g)
    return out


# ---------------------------------------------------------------------------------------------
# The interface the experiments use (math_world.py has the same)
# ---------------------------------------------------------------------------------------------
def training_problems(n: int, train_file: str | None = None) -> list[dict]:
    """n fixed training graphs of the slice (train_file is the math world's)."""
    return cell_problems(SLICE, n, split="train")


def fresh_problems(seed: int, step: int, n: int) -> list[dict]:
    """n new graphs of the slice for one step, seeded by (seed, step): unbounded coverage."""
    rng = random.Random(f"fresh-{seed}-{step}")
    graphs = [make_graph(rng, *SLICE) for _ in range(n)]
    return [{"prompt": graph_prompt(g), "gold": g.answer} for g in graphs]


def evaluation_sets(n: int, names=None, data_dir: str | None = None,
                    train_graphs: bool = False) -> dict:
    """n held-out graphs of every evaluation cell, and of the training graphs when asked (names
    and data_dir are the math world's benchmark options)."""
    sets = {c: cell_problems(c, n) for c in EVAL_CELLS}
    return dict(sets, train_graphs=cell_problems(SLICE, n, split="train")) if train_graphs else sets


def check_files(train_file: str | None, data_dir: str | None, names=None) -> None:
    """Nothing to check: the toy world makes its data."""


def grade(responses: list[str], golds: list[str], think_in_prompt: bool = False,
          timeout_s: float = 5.0) -> common.GradeReport:
    """The toy verifier on each response, in this process (pure and instant: no timeouts)."""
    return common.GradeReport(correct=[verify(r, g) for r, g in zip(responses, golds)])


def eval_sampling(preset: dict, k: int, max_new_tokens: int) -> tuple[int, float, float, int]:
    """Greedy (deterministic and cheap): k = 1, temperature 0, up to the run's response budget."""
    return 1, 0.0, 1.0, max_new_tokens


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE,
                                   padding_side="left")


@dataclass
class PretrainSettings:
    out_dir: str = arg("toy_model", "where the Hugging Face model directory is written")
    seed: int = arg(0, "seed for the corpus stream, the initialisation and the shuffles")
    steps: int = arg(10000, "optimizer steps (the loss plateaus, then drops after ~1k steps: "
                     "judge by accuracy)")
    batch_size: int = arg(32, "sequences per step, fresh from the writer every step")
    lr: float = arg(2e-3, "peak AdamW learning rate (linear warm-up, cosine decay to 10 %)")
    warmup: int = arg(100, "warm-up steps")
    p_guided: float = arg(0.3, "share of guided (hinted) examples in the corpus")
    p_confident: float = arg(0.2, "probability that the writer drops `maybe` before the goal arm "
                             "(design choice 1)")
    p_drop_hedge: float = arg(0.0, "control corpus: probability of omitting `maybe` at any choice "
                              "while still backtracking")
    p_confident_wrong: float = arg(0.0, "control corpus (wrong and revised): probability of "
                                   "dropping `maybe` before a wrong arm, walked, then revised")
    filler: str = arg("", f"control corpus: a content-free word added as often as the doubt "
                      f"words (the filler control uses `{FILLER}`); empty = none")
    init_from: str | None = arg(None, "continue pretraining from this model directory (controls) "
                                "instead of a fresh model")
    hidden: int = arg(128, "hidden size")
    layers: int = arg(4, "transformer layers")
    heads: int = arg(4, "attention heads")
    eval_every: int = arg(500, "steps between greedy accuracy checks on the evaluation cells")
    threads: int = arg(2, "torch CPU threads (the wall time in the README is for 2)")
    extra_cells: str = arg("", "cells added to the corpus' cell list to oversample them, e.g. "
                           "`5x4,4x5` (recipe stage 3)")


def corpus_cells(s: PretrainSettings) -> list[tuple[int, int]]:
    """PRETRAIN_CELLS plus `extra_cells` ("DxL,DxL"): a cell listed twice is drawn twice as
    often."""
    extra = [tuple(int(v) for v in c.split("x")) for c in s.extra_cells.split(",") if c.strip()]
    return PRETRAIN_CELLS + extra


def corpus_style(s: PretrainSettings) -> dict:
    """The writer's control options (all off in the shipped corpus)."""
    return dict(p_drop_hedge=s.p_drop_hedge, p_confident_wrong=s.p_confident_wrong,
                filler=s.filler)


def corpus_batch(rng: random.Random, tokenizer, s: PretrainSettings, n: int):
    """n fresh (prompt ids, response ids) examples from the writer."""
    seqs, cell = [], rng.choice(corpus_cells(s))  # one cell per batch: little padding
    for _ in range(n):
        g = make_graph(rng, *cell)
        hint = rng.choice(["full", "full", "answer"]) if rng.random() < s.p_guided else "none"
        style = corpus_style(s)
        response = (unguided_trace(g, rng, s.p_confident, **style) if hint == "none"
                    else guided_trace(g, hint, s.filler, rng))
        message = user_message(g, hint, rng, s.p_confident, **style)
        prompt_ids = common.prompt_ids(tokenizer, message, thinking=True)
        response_ids = tokenizer(response).input_ids + [tokenizer.eos_token_id]
        seqs.append((prompt_ids, response_ids))
    return seqs


def new_model(tokenizer, s: PretrainSettings):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(VOCAB), hidden_size=s.hidden,
                         intermediate_size=4 * s.hidden, num_hidden_layers=s.layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.heads,
                         head_dim=s.hidden // s.heads, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.toy_world = True  # marks any saved copy as a toy-world model (common.resolve_preset)
    return Qwen3ForCausalLM(config)


def pretrain(s: PretrainSettings) -> None:
    parallel.cpu_threads(s.threads)
    common.set_seed(s.seed)
    rng, tokenizer = random.Random(s.seed), build_tokenizer()
    model = (new_model(tokenizer, s) if s.init_from is None
             else common.load_model(s.init_from, device="cpu")[0].train())
    print(f"toy model: {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / s.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, k / s.steps)))))
    t0 = time.time()
    steps = progress.bar(range(1, s.steps + 1), "pretrain")
    for step in steps:
        loss = loss_head.lm_step(model, opt, corpus_batch(rng, tokenizer, s, s.batch_size),
                                 tokenizer.pad_token_id)
        sched.step()
        if step % 50 == 0:
            progress.report(steps, f"step {step}", loss=f"{loss:.4f}",
                            elapsed=f"{time.time() - t0:.0f}s")
        if step % s.eval_every == 0 or step == s.steps:
            acc = {c: evaluate_cell(model, tokenizer, c, "none", n=64)["accuracy"]
                   for c in EVAL_CELLS}
            progress.say(f"step {step} greedy accuracy {acc}")
    model.save_pretrained(s.out_dir)
    tokenizer.save_pretrained(s.out_dir)
    print(f"saved {s.out_dir} after {time.time() - t0:.0f}s")


# How the shipped toy_model/ was made. Stage 1 alone reached greedy accuracy 0.870 on ood_d5
# (n=200), under the 0.9 bar; a plain continuation (stage 2) did not move it (0.875); stage 3
# oversamples the deeper cells at a lower learning rate (0.930). The bar is about the base model's
# competence; no stage looks at distillation or RL results.
RECIPE = [
    dict(seed=0, steps=10000, lr=2e-3, threads=2),
    dict(seed=1, steps=3000, lr=5e-4, threads=2),
    dict(seed=2, steps=2000, lr=5e-4, threads=1, extra_cells="5x3,5x4,5x5,4x4,4x5,5x4"),
]


# The controls' corpora (docs/TOY_WORLD.md "Controls"): each continues pretraining the shipped
# model on a corpus whose writer has one option on, with the same seed, steps and lr; the bases
# ship in results/controls/<name>/model (regenerate: python toy_world.py control NAME).
CONTROLS = {"drop_hedge": dict(p_drop_hedge=0.5), "wrong_revised": dict(p_confident_wrong=0.2),
            "filler": dict(filler=FILLER)}
CONTROL_PRETRAIN = dict(init_from="toy_model", seed=3, steps=2000, lr=5e-4, threads=1)


def control_base(name: str, out_dir: str | None = None) -> None:
    """Continue-pretrain the shipped model on control `name`'s corpus (CONTROLS)."""
    if name not in CONTROLS:
        raise ValueError(f"unknown control {name!r}: use one of {', '.join(CONTROLS)}")
    out_dir = out_dir or f"results/controls/{name}/model"
    pretrain(PretrainSettings(out_dir=out_dir, **CONTROL_PRETRAIN, **CONTROLS[name]))


def build(out_dir: str = "toy_model") -> None:
    """Run RECIPE stage by stage, each continuing from the last (stage k is kept in
    `out_dir.stage<k>`)."""
    init = None
    for k, stage in enumerate(RECIPE, 1):
        stage_dir = out_dir if k == len(RECIPE) else f"{out_dir}.stage{k}"
        pretrain(PretrainSettings(out_dir=stage_dir, init_from=init, **stage))
        init = stage_dir


def cell_problems(cell: str | tuple[int, int], n: int, split: str = "heldout", hint: str = "none",
                  seed: int = 0) -> list[dict]:
    """Evaluation problems {prompt, gold} of one cell (a name from EVAL_CELLS or a (D, L) pair)."""
    rng = random.Random(seed)
    graphs = eval_graphs(EVAL_CELLS.get(cell, cell) if isinstance(cell, str) else cell, n, split)
    return [{"prompt": user_message(g, hint, rng), "gold": g.answer} for g in graphs]


def evaluate_cell(model, tokenizer, cell, hint: str = "none", n: int = 200, split: str = "heldout",
                  temperature: float = 0.0, seed: int = 0, generator=None) -> dict:
    """Accuracy (= avg@1), length and doubt words of one cell under one hint type, greedy by
    default, through the same `common.evaluate` as the math world."""
    metrics, _ = common.evaluate(generator or rollout.HFGenerator(model, tokenizer), tokenizer,
                                 common.resolve_preset("toy"),
                                 cell_problems(cell, n, split, hint, seed), k=1,
                                 temperature=temperature, top_p=1.0, max_tokens=64, seed=seed,
                                 grade=grade)
    return dict(metrics, accuracy=metrics["avg@1"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pretrain"]:
        pretrain(parse_settings(PretrainSettings, argv[1:]))
        return
    if argv[:1] == ["build"]:
        build(*argv[1:2])
        return
    if argv[:1] == ["control"] and len(argv) in (2, 3):
        control_base(*argv[1:3])
        return
    if argv[:1] not in (["evaluate"], []):
        raise ValueError(f"unknown command {argv[0]!r}: usage: python toy_world.py [evaluate | "
                         "build [OUT_DIR] | pretrain [--help] | control NAME [OUT_DIR]]")
    torch.set_num_threads(2)
    model, tokenizer, _ = common.load_model("toy")
    rows = []
    for cell, (D, L) in EVAL_CELLS.items():
        row = {"cell": cell, "D": D, "L": L}
        for hint in HINTS:
            m = evaluate_cell(model, tokenizer, cell, hint)
            row[f"{HINT_LABELS[hint]} accuracy"] = m["accuracy"]
            row[f"{HINT_LABELS[hint]} doubt words"] = m["epistemic/total"]
        rows.append(row)
    print(tables.format_table(rows))
    print("accuracy: greedy, n = 200 graphs per cell; doubt words: epistemic count per response")


if __name__ == "__main__":
    cli(main)
