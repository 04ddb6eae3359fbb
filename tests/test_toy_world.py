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


def failure(g, response, finish="stop"):
    problem = {"prompt": tw.graph_prompt(g), "gold": g.answer}
    return tw.failure_class(problem, response, finish, tw.verify(response, g.answer))


def test_verifier_and_failure_classes_on_hand_written_responses():
    g = tw.make_graph(random.Random(0), 3, 4)
    wrong = [a for a in g.arms if a[0] != g.answer]
    walk = lambda arm, hedge="maybe ": f"{g.start} {hedge}{' '.join(arm)}"  # noqa: E731
    goal = g.arms[g.goal]
    assert tw.verify(tw.guided_trace(g, "full"), g.answer)
    assert not tw.verify("<think> x", g.answer)  # unfinished thinking: no answer
    assert failure(g, tw.guided_trace(g, "full")) == "correct"
    assert failure(g, "<think> x </think> done") == "no_answer"
    loop = "<think> " + " wait ".join([walk(wrong[0])] * 9)
    assert failure(g, loop, "length") == "cut_at_limit"
    commit = f"<think> {walk(wrong[0], '')} </think> answer {wrong[0][0]}"
    assert failure(g, commit) == "wrong_commit"
    repeat = f"<think> {walk(wrong[0])} wait {walk(wrong[1])} wait {walk(wrong[0])} </think> "
    assert failure(g, repeat + f"answer {wrong[1][0]}") == "repeated_arm"
    misread = f"<think> {walk(wrong[0])} wait {walk(goal, '')} </think> answer {wrong[0][0]}"
    assert failure(g, misread) == "misread"
    skip = f"<think> {g.start} maybe {wrong[0][0]} {wrong[0][2]} </think> answer {wrong[0][0]}"
    assert failure(g, skip) == "invalid_edge"  # a skipped node is a step not in the graph
    jump = f"<think> {wrong[0][1]} {wrong[0][2]} </think> answer {wrong[0][0]}"
    assert failure(g, jump) == "invalid_edge"  # a walk that does not open at the start node
    stub = f"<think> {g.start} the wait {walk(wrong[0])} </think> answer {wrong[0][0]}"
    assert failure(g, stub) == "wrong_commit"  # a segment of the start node alone: no arm
    filler = f"<think> the {walk(wrong[0])} the wait the {walk(goal)} </think> answer {g.answer}"
    assert failure(g, filler) == "correct"
    with_filler = f"<think> {g.start} the maybe {wrong[0][0]} the {' '.join(wrong[0][1:])} wait "
    assert failure(g, with_filler + f"{walk(goal)} </think> answer {wrong[1][0]}") == "misread"


def test_failure_shares_sum_to_one_and_refuse_unknown_classes():
    shares = common.failure_shares(["correct", "misread", "correct"], tw.FAILURE_CLASSES)
    assert set(shares) == {f"failure/{c}" for c in tw.FAILURE_CLASSES}
    assert sum(shares.values()) == pytest.approx(1.0) and shares["failure/correct"] == 2 / 3
    with pytest.raises(ValueError, match="not among"):
        common.failure_shares(["lost"], tw.FAILURE_CLASSES)


def test_token_types_of_a_search_trace():
    words = "<think> s maybe a1 a2 wait s the b1 b2 </think> answer b1 <|endoftext|>".split()
    words = [w.replace("s", "n0").replace("a", "n1").replace("b", "n2") if w[0] in "sab" else w
             for w in words]
    assert tw.token_types(words) == ["other", "other", "maybe", "branch", "arm", "wait", "other",
                                     "other", "branch", "arm", "answer", "answer", "answer",
                                     "answer"]


def test_control_writers_keep_the_shipped_corpus_and_change_only_their_property():
    rng_a, rng_b, g = random.Random(5), random.Random(5), graphs(1)[0]
    for _ in range(50):  # options off: the shipped writer's random stream is untouched
        assert tw.unguided_trace(g, rng_a, 0.2) == tw.unguided_trace(g, rng_b, 0.2,
                                                                     p_confident_wrong=0.0)
    rng, revised, fillers = random.Random(0), 0, []
    for g in graphs(300):
        words = tw.unguided_trace(g, rng, 0.2, p_confident_wrong=1.0).split()
        heads = [w for p, w in zip(words, words[1:]) if p == g.start]
        revised += any(h != g.answer and h in tw.LABELS for h in heads)  # a wrong arm, no `maybe`
        text = tw.unguided_trace(g, rng, 0.2, filler=tw.FILLER)
        doubt = common.epistemic_total(common.count_epistemic(text))
        fillers.append(text.split().count(tw.FILLER) == doubt)
        assert tw.verify(text, g.answer)
    assert revised > 100 and all(fillers)
    assert tw.guided_trace(g, "full", tw.FILLER) == tw.guided_trace(g, "full")  # no doubt: none


def test_probe_set_stops_at_the_first_choice():
    items = tw.probe_set(4)
    assert len(items) == 4 and len({m for m, _, _ in items}) == 4
    for student, teacher, prefix in items:
        assert teacher.startswith(student) and "Correct solution" in teacher
        assert prefix.split()[0] == "<think>" and prefix.split()[1] in tw.LABELS


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
