"""The real chat templates (../shared/data/templates: byte-exact Qwen3-8B / Qwen3-1.7B and
DeepSeek-R1-Distill-Qwen-7B strings, provenance in its README) through the project's prompt
functions: student prompt, teacher prompt, thinking on/off, the detection of a template that
opens <think> in the prompt, and one BOS (not two) in DeepSeek's tokenized prompt.

The tokenizer is the tests' own (tiny-random's byte-level one) with the real template set and
the template's special tokens added; for DeepSeek it also prepends BOS when asked to add special
tokens, as DeepSeek's tokenizer does (`add_bos_token`). Expected strings are the README's
reference renders. Skips cleanly when ../shared is absent.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import tiny  # noqa: E402
import exp02_onpolicy_grpo_sdpo as e  # noqa: E402

TEMPLATES = Path(__file__).parents[1] / ".." / "shared" / "data" / "templates"
QWEN3 = ["qwen3.jinja", "qwen3.2025-04-release.jinja"]
R1 = "deepseek-r1-distill-qwen.jinja"
R1_ORIGINAL = "deepseek-r1-distill-qwen.2025-01-original.jinja"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
Q = "What is 2+2?"  # the README's reference input
SOLUTION = "<think>\nTwo and two.\n</think>\n\n\\boxed{4}"


def template(name: str) -> str:
    path = TEMPLATES / name
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared ships beside the repo, not in it)")
    return path.read_text(encoding="utf-8")


def qwen3_tokenizer(name: str = "qwen3.jinja"):
    _, tok = (
        tiny.tiny_random_model()
    )  # <|im_start|>, <|im_end|>, <|endoftext|>, <think>, </think>
    tok.chat_template = template(name)
    return tok


def r1_tokenizer(name: str = R1):
    from tokenizers import processors

    _, tok = tiny.tiny_random_model()  # has <think> and </think> as added tokens, as DeepSeek's
    tok.chat_template = template(name)
    tok.add_special_tokens(
        {
            "bos_token": BOS,
            "eos_token": EOS,
            "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"],
        }
    )
    bos_id = tok.convert_tokens_to_ids(BOS)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bos_id)]
    )
    return tok


@pytest.mark.parametrize("name", QWEN3)
def test_qwen3_student_prompt_thinking_on_and_off(name):
    tok = qwen3_tokenizer(name)
    head = f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
    assert common.prompt_text(tok, Q, thinking=True) == head
    assert common.prompt_text(tok, Q, thinking=False) == head + "<think>\n\n</think>\n\n"
    assert not common.opens_think_in_prompt(tok)
    ids = common.prompt_ids(tok, Q, thinking=False)
    tokens = tok.convert_ids_to_tokens(ids)
    assert (
        tokens[0] == "<|im_start|>"
        and tokens.count("<|im_start|>") == 2
        and tokens.count("<|im_end|>") == 1
    )
    assert tokens.count("<think>") == 1 and tokens.count("</think>") == 1  # single added tokens
    assert tok.decode(ids) == common.prompt_text(tok, Q, thinking=False)


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen3_teacher_prompt_keeps_the_demonstration_and_the_instruction(thinking):
    tok = qwen3_tokenizer()
    message = common.teacher_message(Q, SOLUTION)
    text = common.prompt_text(tok, message, thinking)
    closing = "<think>\n\n</think>\n\n" if not thinking else ""
    assert text == (
        f"<|im_start|>user\n{Q}\nCorrect solution:\n\n{SOLUTION}\n\nCorrectly solve the original "
        f"question.<|im_end|>\n<|im_start|>assistant\n{closing}"
    )
    # c = s\think: the demonstration without its thinking, in the same frame
    msgs = e.teacher_messages(
        [Q], ["x", SOLUTION], [0.0, 1.0], n=2, context="s_nothink", think_in_prompt=False
    )
    assert (
        msgs[1] is None
        and "<think>" not in msgs[0]
        and msgs[0].endswith(
            "Correct solution:\n\n\\boxed{4}\n\nCorrectly solve the original question."
        )
    )


@pytest.mark.parametrize("thinking", [True, False])
def test_r1_distill_prompt_opens_think_and_ignores_enable_thinking(thinking):
    tok = r1_tokenizer()
    assert common.prompt_text(tok, Q, thinking) == f"{BOS}<｜User｜>{Q}<｜Assistant｜><think>\n"
    assert common.opens_think_in_prompt(tok)
    teacher = common.prompt_text(tok, common.teacher_message(Q, "\\boxed{4}"), thinking)
    assert teacher == (
        f"{BOS}<｜User｜>{Q}\nCorrect solution:\n\n\\boxed{{4}}\n\nCorrectly solve the original "
        f"question.<｜Assistant｜><think>\n"
    )


def test_r1_distill_original_template_does_not_open_think():
    tok = r1_tokenizer(R1_ORIGINAL)
    assert common.prompt_text(tok, Q, True) == f"{BOS}<｜User｜>{Q}<｜Assistant｜>"
    assert not common.opens_think_in_prompt(tok)


def test_r1_distill_prompt_ids_have_one_bos_not_two():
    """The template writes BOS itself; the tokenizer would add a second one with its special
    tokens (add_bos_token): prompt_ids must not."""
    tok = r1_tokenizer()
    bos = tok.convert_tokens_to_ids(BOS)
    text = common.prompt_text(tok, Q, True)
    assert tok(text).input_ids[:2] == [bos, bos]  # the fixture behaves like DeepSeek's tokenizer
    for message in (Q, common.teacher_message(Q, SOLUTION)):
        ids = common.prompt_ids(tok, message, True)
        assert ids[0] == bos and ids.count(bos) == 1
        assert tok.convert_ids_to_tokens(ids[-2:]) == [
            "<think>",
            "Ċ",
        ]  # ends inside the opened block


def test_a_local_model_with_the_r1_template_is_detected_as_thinking_in_the_prompt(tmp_path):
    """A local directory (no preset) gets think_in_prompt from its template when loaded."""
    model, _ = tiny.tiny_random_model()
    tok = r1_tokenizer()
    model.save_pretrained(tmp_path / "r1")
    tok.save_pretrained(tmp_path / "r1")
    _, loaded, preset = common.load_model(str(tmp_path / "r1"), device="cpu")
    assert preset["think_in_prompt"] is True
    assert common.prompt_ids(loaded, Q, True).count(loaded.convert_tokens_to_ids(BOS)) == 1
    model.save_pretrained(tmp_path / "qwen3")
    qwen3_tokenizer().save_pretrained(tmp_path / "qwen3")
    assert common.load_model(str(tmp_path / "qwen3"), device="cpu")[2]["think_in_prompt"] is False
