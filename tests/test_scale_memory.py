"""Issue 11, findings 5, 9 and 10: the SDPO teacher loads once in its own dtype
(no fp32 copy of the student), the teacher forward keeps only the last hidden state, and the
teacher prompt is cut at --max-teacher-prompt tokens; a torchrun rank ends without the
interpreter's teardown."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from infra import loss_head, parallel, rollout  # noqa: E402
import tiny  # noqa: E402
from tiny import TINY  # noqa: E402
import exp02_onpolicy_grpo_sdpo as e  # noqa: E402
from test_exp02 import tiny_data  # noqa: E402,F401  (fixture)


def _no_module_deepcopy(self, memo):
    raise AssertionError("a model was deep-copied: the teacher must load from the model's files")


def test_teacher_loads_once_in_its_dtype_and_the_student_is_not_copied(tiny_data, monkeypatch):
    loads = []
    real = common.load_model

    def recording(name, device=None, dtype=None):
        loads.append((name, device, dtype))
        return real(name, device=device, dtype=dtype)

    monkeypatch.setattr(common, "load_model", recording)
    monkeypatch.setattr(torch.nn.Module, "__deepcopy__", _no_module_deepcopy, raising=False)
    s = e.Settings(
        model=TINY,
        steps=1,
        prompts_per_step=2,
        rollouts=2,
        max_new_tokens=4,
        eval_k=1,
        train_file=str(tiny_data / "train.parquet"),
        data_dir=str(tiny_data),
        topk=8,
        threads=1,
        micro_batch_size=4,
        device="cpu",
        checkpoint_every=0,
    )
    e.train_arm(replace(s, method="sdpo", teacher_context="s"), str(tiny_data / "sdpo"))
    assert (
        loads == [(TINY, "cpu", torch.float32)] * 2
    )  # student, then teacher: fp32 on the CPU
    loads.clear()
    e.train_arm(replace(s, method="grpo"), str(tiny_data / "grpo"))
    assert loads == [(TINY, "cpu", torch.float32)]  # GRPO: no teacher at all


def test_teacher_of_a_cuda_run_is_bf16_and_equals_the_cast_student():
    student = common.load_model(TINY, device="cpu", dtype=torch.float32)[0]
    teacher = e.load_teacher(
        TINY, "cpu", cuda=True
    )  # loaded on the CPU, as a sharded run does
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16} and not teacher.training
    for (name, p), q in zip(student.named_parameters(), teacher.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), name
    teacher = e.load_teacher(TINY, "cpu", cuda=False)
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}


@pytest.mark.parametrize("grad", [False, True])
def test_last_hidden_state_equals_the_last_of_output_hidden_states(grad):
    """The hook takes the same (final-norm) values that output_hidden_states[-1] gave, and the
    teacher forward keeps nothing else: token_stats' outputs are unchanged."""
    model, tok = tiny.tiny_random_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pairs = [([5, 6, 7], [8, 9, 10, 11]), ([12, 13], [14, 15, 16])]
    ids, att, lab = loss_head.pack_sequences(pairs, tok.pad_token_id)
    model.train(grad)
    with torch.set_grad_enabled(grad):
        out = model(input_ids=ids, attention_mask=att, output_hidden_states=True, use_cache=False)
        ref = out.hidden_states
        got = loss_head.last_hidden_state(model, ids, att)
    assert len(ref) == model.config.num_hidden_layers + 1
    assert torch.equal(got, ref[-1]) and got.requires_grad == grad
    assert not torch.equal(ref[-1], ref[-2])  # the comparison tells the last state from the others
    assert not model.model._forward_hooks  # the hook is removed


def test_full_weights_cast_before_gathering_equals_cast_after():
    """Single process: no DTensor, the same tensors as the state dict cast to bf16 (the 2-process
    FSDP2 check is in tests/test_scale.py's worker)."""
    model, _ = tiny.tiny_random_model()
    got = dict(parallel.full_weights(model))
    ref = model.state_dict()
    assert list(got) == list(ref)
    for k, v in ref.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k


def test_teacher_prompt_cut_keeps_the_first_tokens_and_defaults_by_world():
    assert e.cut_teacher_prompt(list(range(10)), 4) == [
        0,
        1,
        2,
        3,
    ]  # right truncation, as the release
    assert e.cut_teacher_prompt(list(range(10)), 0) == list(range(10))
    assert e.cut_teacher_prompt(list(range(3)), 4) == [0, 1, 2]
    import math_world
    import toy_world

    math_arm = e.Settings(model=TINY, method="sdpo")
    assert e.resolve(math_arm, math_world).max_teacher_prompt == 22528
    assert e.resolve(e.Settings(method="sdpo"), toy_world).max_teacher_prompt == 0
    with pytest.raises(ValueError, match="max-teacher-prompt"):
        e.resolve(replace(math_arm, max_teacher_prompt=-1), math_world)


def test_teacher_context_cuts_long_teacher_prompts_and_counts_them(half_right_grading):
    """The math code path: with a cap below the teacher prompt's length every teacher sequence
    keeps the first `cap` prompt tokens (then the response), and the cut share is counted;
    without a cap the prompts are whole."""
    import math_world

    model, tok = tiny.tiny_random_model()
    preset = dict(common.resolve_preset(TINY))
    batch = [{"prompt": "What is 1+1?", "gold": "2"}]
    gen = rollout.make_generator(model, tok, "hf")

    def context(cap):
        s = e.Settings(method="sdpo", rollouts=4, max_new_tokens=6, max_teacher_prompt=cap)
        r = e.rollout(s, math_world, preset, tok, gen, batch, step=1)
        e.add_teacher_context(s, r, preset, tok, batch)
        return r

    whole = context(0)
    lengths = [len(p) for p, _ in whole.teacher_seqs]
    assert whole.teacher_cut == 0 and min(lengths) > 20
    cap = min(lengths) - 5
    cut = context(cap)
    assert cut.teacher_cut == 4
    for (p, r), (pw, rw) in zip(cut.teacher_seqs, whole.teacher_seqs):
        assert p == pw[:cap] and r == rw


def test_shutdown_distributed_with_exit_code_ends_the_process_after_flushing(tmp_path):
    """Finding 10: a rank ends with os._exit right after destroying its process group (no
    interpreter teardown with gloo threads alive), its output flushed and its status kept."""
    import subprocess

    script = tmp_path / "rank.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import torch.distributed as dist\n"
        "from infra import parallel\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
        "print('table', end='')\n"
        "parallel.shutdown_distributed(exit_code=3)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == "table", (proc.stdout, proc.stderr[-2000:])
    parallel.shutdown_distributed(exit_code=0)  # no process group here: a no-op, the test goes on
