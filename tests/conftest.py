import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests skip cleanly on machines without CUDA (this one, CI)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def tiny_models() -> None:
    """The test-only models (tests/tiny.py) on disk, for `--model PATH` in subprocess runs."""
    import tiny

    tiny.ensure()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a clean skip on a fresh clone that does not have it."""
    if not (SHARED_DATA / "paper").exists():
        pytest.skip(f"{SHARED_DATA} is absent (it ships beside the repo, not in it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def answering_model(tmp_path_factory) -> Path:
    """A tiny-random Qwen3 fine-tuned for a few seconds to answer every question with a short
    thinking block and `\\boxed{2}`, saved as a local model directory: end-to-end tests get real,
    gradeable successes (and failures, at temperature 1) through the math-world code path."""
    import torch

    import common
    from infra.loss_head import lm_step, pack_sequences
    from tiny import tiny_random_model

    model, tokenizer = tiny_random_model()
    text = "<think>\nhmm, maybe two\n</think>\n\n\\boxed{2}"
    response = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    questions = [f"What is {i}+{2 - i}?" for i in range(3)]  # asked plainly and with the teacher's hint
    messages = questions + [common.teacher_message(q, hint) for q in questions for hint in (text, "\\boxed{2}")]
    pairs = [(common.prompt_ids(tokenizer, m, thinking=True), response) for m in messages]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    ids, mask, labels = pack_sequences(pairs, tokenizer.pad_token_id)
    for _ in range(300):  # until the response is learnt (~60 steps), judged after the update
        lm_step(model, opt, pairs, tokenizer.pad_token_id)
        with torch.no_grad():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        if loss < 0.01:
            break
    assert loss < 0.01, f"the answering model did not learn its response (loss {loss:.3f})"
    path = tmp_path_factory.mktemp("answering_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def half_right_grading(monkeypatch) -> None:
    """The math world's grader, with every other response (0, 2, 4, ...) marked correct: a tiny
    random model's rollouts then get rewards of both kinds and SDPO demonstrations."""
    import math_world

    real = math_world.grade

    def half_right(responses, golds, think_in_prompt=False, timeout_s=5.0):
        report = real(responses, golds, think_in_prompt, timeout_s)
        report.correct = [i % 2 == 0 for i in range(len(responses))]
        return report

    monkeypatch.setattr(math_world, "grade", half_right)


def pytest_terminal_summary(terminalreporter):
    """One line for CI: how many tests of the `vllm` tier ran (passed or failed) and skipped."""
    outcome = {}
    for kind in ("passed", "failed", "error", "skipped"):
        for rep in terminalreporter.stats.get(kind, []):
            if "vllm" in getattr(rep, "keywords", {}) and rep.nodeid not in outcome:
                outcome[rep.nodeid] = kind
    ran = sum(k != "skipped" for k in outcome.values())
    terminalreporter.write_line(f"vllm tier: {ran} ran, {len(outcome) - ran} skipped")
