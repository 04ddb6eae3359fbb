"""Reading the release's parquet files (verl layout): decoding both of its layouts and
refusing malformed rows with a message naming the file, row and column.

Infrastructure only (the science is in the experiments, common.py and the worlds)."""
from __future__ import annotations

import json

import numpy as np


def read_paper_parquet(path) -> list[dict]:
    """Rows of a verl-layout parquet as [{"prompt", "gold", "data_source", "extra_info"}].

    Handles both layouts of the release: nested columns (aime24, coverage/*: prompt is an array of
    one {role, content} dict, reward_model a dict) and JSON strings (aime25, amc23, math500). prompt
    is the
    single user message's text; gold = str(reward_model["ground_truth"]).
    """
    import pandas as pd

    df = pd.read_parquet(path)
    if len(df) == 0:
        raise ValueError(f"{path}: no rows")
    for col in ("prompt", "reward_model", "data_source"):
        if col not in df.columns:
            raise ValueError(
                f"{path}: missing column {col!r} (verl layout: data_source, prompt, "
                "reward_model, extra_info)"
            )

    def bad(col: str, i: int, expected: str, got) -> ValueError:
        return ValueError(
            f"{path}: column {col!r} row {i}: expected {expected}, got {str(got)[:120]!r}"
        )

    def decode(value, col: str, i: int):  # JSON-string layout -> the nested layout's objects
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise bad(col, i, "JSON (string is not JSON)", value) from None

    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        msgs = decode(rec["prompt"], "prompt", i)
        msgs = list(msgs) if isinstance(msgs, (list, tuple, np.ndarray)) else []
        if len(msgs) != 1 or not isinstance(msgs[0], dict) or msgs[0].get("role") != "user" \
                or not isinstance(msgs[0].get("content"), str):
            raise bad(
                "prompt", i, "a list of one {'role': 'user', 'content': str} message", rec["prompt"]
            )
        rm = decode(rec["reward_model"], "reward_model", i)
        gold = rm.get("ground_truth") if isinstance(rm, dict) else None
        if isinstance(gold, bool) or not isinstance(
            gold, (str, int, float, np.integer, np.floating)
        ):
            raise bad(
                "reward_model", i, "a dict with a str/int 'ground_truth'", rec["reward_model"]
            )
        if not isinstance(rec["data_source"], str):
            raise bad("data_source", i, "str", rec["data_source"])
        extra = decode(rec.get("extra_info"), "extra_info", i) or {}
        if not isinstance(extra, dict):
            raise bad("extra_info", i, "a dict", extra)
        rows.append(
            {
                "prompt": msgs[0]["content"],
                "gold": str(gold),
                "data_source": rec["data_source"],
                "extra_info": extra,
            }
        )
    return rows
