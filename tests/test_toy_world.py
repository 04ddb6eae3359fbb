"""Toy-world generator invariants and the shipped model's accuracy bar."""
import random

import pytest

import common
import toy_world as tw


def graphs(n=300):
    rng = random.Random(1)
    return [tw.make_graph(rng, *rng.choice(tw.PRETRAIN_CELLS)) for _ in range(n)]


def test_answer_is_unique_and_graph_is_a_star():
    for g in graphs():
        D, L = len(g.arms), len(g.arms[0])
        assert len(g.edges) == D * L and len(set(g.edges)) == D * L
        nodes = [g.start] + [x for a in g.arms for x in a]
        assert len(set(nodes)) == D * L + 1  # arms disjoint -> exactly one arm reaches the target
        succ = {}
        for u, v in g.edges:
            succ.setdefault(u, []).append(v)
        assert sorted(succ[g.start]) == sorted(a[0] for a in g.arms)
        reaching = [a[0] for a in g.arms if g.target in a]
        assert reaching == [g.answer]


def walk_is_valid(g, trace):
    """Every step of the trace follows an edge; each arm walk ends at a leaf; answer is gold."""
    succ = dict(g.edges)
    words = common.split_thinking(trace)[0].split()
    prev = None
    for w in words:
        if w in ("maybe", "wait"):
            continue
        if w == g.start:
            prev = g.start
            continue
        assert prev is not None and (prev == g.start and w in [a[0] for a in g.arms] or succ.get(prev) == w), trace
        prev = w
    assert prev == g.target
    return tw.verify(trace, g.answer)


def test_every_trace_is_valid_and_guided_traces_hedge_less():
    rng = random.Random(2)
    for g in graphs():
        un = tw.unguided_trace(g, rng, p_confident=0.2)
        assert walk_is_valid(g, un)
        words = un.split()
        assert words.count("wait") == words.count(g.start) - 1  # one `wait` per dead end
        assert walk_is_valid(g, tw.guided_trace(g, "full"))
        assert common.epistemic_total(common.count_epistemic(tw.guided_trace(g, "full"))) == 0
        assert common.count_epistemic(tw.guided_trace(g, "answer"))["maybe"] == 1


def test_last_arm_needs_no_hedge_and_confident_choice_is_never_revised():
    rng = random.Random(3)
    for g in graphs():
        words = tw.unguided_trace(g, rng, p_confident=1.0).split()
        # with p_confident = 1 the goal arm is never hedged, so every `maybe` is followed by a dead end
        assert words.count("maybe") == words.count("wait")


def test_heldout_and_train_graphs_are_disjoint_and_fixed():
    train = {tw.graph_prompt(g) for g in tw.eval_graphs(tw.SLICE, 200, "train")}
    held = [tw.graph_prompt(g) for g in tw.eval_graphs(tw.SLICE, 200, "heldout")]
    assert not train & set(held)
    assert held == [tw.graph_prompt(g) for g in tw.eval_graphs(tw.SLICE, 200, "heldout")]


def test_tokenizer_round_trip_and_teacher_prompt_genre():
    tok = tw.build_tokenizer()
    g = graphs(1)[0]
    msg = tw.user_message(g, "full", random.Random(0), 0.2)
    assert "Correct solution:" in msg and msg.endswith("Correctly solve the original question.")
    ids = common.prompt_ids(tok, msg, thinking=True)
    assert tok.unk_token_id is None or tok.convert_tokens_to_ids("<pad>") not in ids
    text = " ".join(msg.split())
    assert tok.decode(tok(text).input_ids) == text


def test_verifier_and_failure_classes():
    g = graphs(1)[0]
    wrong = [a for a in g.arms if a[0] != g.answer][0]
    assert tw.verify(tw.guided_trace(g, "full"), g.answer)
    assert not tw.verify("<think> x", g.answer)  # unfinished thinking: no answer
    assert tw.classify(g, "<think> x") == "no_answer"
    assert tw.classify(g, tw.guided_trace(g, "full")) == "correct"
    commit = f"<think> {g.start} {' '.join(wrong)} </think> answer {wrong[0]}"
    assert tw.classify(g, commit) == "wrong_commit"
    repeat = f"<think> {g.start} maybe {' '.join(wrong)} wait {g.start} maybe {' '.join(wrong)} </think> answer {wrong[0]}"
    assert tw.classify(g, repeat) == "repeated_arm"


@pytest.fixture(scope="module")
def toy():
    return common.load_model("toy")


@pytest.mark.parametrize("cell", list(tw.EVAL_CELLS))
def test_shipped_model_meets_the_bar(toy, cell):
    """Shipping bar: unguided greedy accuracy >= 0.9 on every evaluated cell; guided (c = s)
    accuracy ~1.0 with almost no doubt words."""
    model, tokenizer, _ = toy
    unguided = tw.evaluate_cell(model, tokenizer, cell, "none", n=200)
    guided = tw.evaluate_cell(model, tokenizer, cell, "full", n=200)
    assert unguided["accuracy"] >= 0.9, unguided
    assert unguided["epistemic/total"] > 1.0  # the base model searches with doubt words
    assert guided["accuracy"] >= 0.98, guided
    assert guided["epistemic/total"] <= 0.05, guided
