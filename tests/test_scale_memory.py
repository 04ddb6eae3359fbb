"""Memory at scale (issue 11, findings 5 and 9): the SDPO teacher loads once in its own dtype
(no fp32 copy of the student), the teacher forward keeps only the last hidden state, and the
teacher prompt is cut at --max-teacher-prompt tokens."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
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
    s = e.Settings(model="tiny-random", steps=1, prompts_per_step=2, rollouts=2, max_new_tokens=4, eval_k=1,
                   train_file=str(tiny_data / "train.parquet"), data_dir=str(tiny_data), topk=8,
                   threads=1, micro_batch_size=4, device="cpu", checkpoint_every=0)
    e.train_arm(s, "sdpo", "s", str(tiny_data / "sdpo"))
    assert loads == [("tiny-random", "cpu", torch.float32)] * 2  # student, then teacher: fp32 on the CPU
    loads.clear()
    e.train_arm(s, "grpo", "s", str(tiny_data / "grpo"))
    assert loads == [("tiny-random", "cpu", torch.float32)]  # GRPO: no teacher at all


def test_teacher_of_a_cuda_run_is_bf16_and_equals_the_cast_student():
    student = common.load_model("tiny-random", device="cpu", dtype=torch.float32)[0]
    teacher = e.load_teacher("tiny-random", "cpu", cuda=True)  # loaded on the CPU, as a sharded run does
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16} and not teacher.training
    for (name, p), q in zip(student.named_parameters(), teacher.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), name
    teacher = e.load_teacher("tiny-random", "cpu", cuda=False)
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
