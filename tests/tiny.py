"""Test-only models: a few-hundred-k-parameter Qwen3 with a byte-level tokenizer and a
Qwen3-style chat template (TINY), and its DeepSeek-R1-style twin whose generation prompt opens
<think> (TINY_R1), saved once per checkout as local model directories so that subprocess runs
can pass them as `--model PATH`. Their config.json carries `preset` overrides (32 new tokens)."""
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.gettempdir()) / f"sd-repro-tests-{os.getuid()}-{hashlib.md5(str(ROOT).encode()).hexdigest()[:8]}"
TINY = str(_HOME / "tiny-random")
TINY_R1 = str(_HOME / "tiny-random-r1")


def tiny_random_model(think_in_prompt: bool = False, seed: int = 0):
    """A ~360k-parameter Qwen3 with a byte-level tokenizer and a Qwen3-style chat template
    (DeepSeek-R1-style when `think_in_prompt`: the generation prompt opens <think>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    opener = "<think>\n" if think_in_prompt else ""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n" + opener +
                "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
                "{% endif %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=template, padding_side="left",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.add_tokens(["<think>", "</think>"])
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config), tokenizer



def ensure() -> None:
    """Write TINY and TINY_R1 once (to a temporary name, then renamed: never half a model)."""
    for path, r1 in ((TINY, False), (TINY_R1, True)):
        if (Path(path) / "config.json").exists():
            continue
        model, tokenizer = tiny_random_model(think_in_prompt=r1)
        model.config.preset = {"max_new_tokens": 32}
        tmp = Path(f"{path}.tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
