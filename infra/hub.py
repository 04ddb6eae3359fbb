"""Reaching the Hugging Face hub: fail at once, in one paragraph naming the fix, when it cannot
be reached (the hub client retries for ~48 s otherwise).

Infrastructure only (the science is in the experiments, common.py and the worlds)."""
from __future__ import annotations

import os


class SetupError(RuntimeError):
    """Something the run needs cannot be had (a hub model or dataset offline, a missing file);
    the message names the fix."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_unreachable(hub_id: str, kind: str) -> str | None:
    """Why the Hugging Face hub cannot be reached (one TCP connect, 3 s at most), or None. The hub
    client retries an unreachable host for ~48 s before failing; this answers at once. A model or
    dataset in the local cache still loads offline (callers then read the cache only)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3
        ).close()
        return None
    except OSError as e:
        return f"{url.hostname}: {e}"


def offline_message(hub_id: str, kind: str, error: BaseException | str) -> str:
    """One paragraph: what failed (the whole underlying message), and the two ways out."""
    what = " ".join(str(error).split()) if isinstance(error, str) else \
        f"{error.__class__.__name__}: {' '.join(str(error).split())}"
    local = ("pass the directory with --model PATH" if kind == "model" else
             "pass local parquet files in the paper's layout with --train-file / --data-dir")
    return (
        f"could not load the {kind} {hub_id!r} from the Hugging Face hub ({what}). If this "
        "machine is "
        f"offline: download it on a connected one (`huggingface-cli download {hub_id}`"
        f"{' --repo-type dataset' if kind == 'dataset' else ''}) and either copy the cache here "
        f"and set HF_HUB_OFFLINE=1, or {local}."
    )


def load_hub_dataset(hub_id: str, split: str):
    """datasets.load_dataset, failing at once (SetupError naming the local-file options) when the
    hub cannot be reached, instead of after the hub client's retries."""
    offline = hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in (
        "1",
        "true",
        "yes",
        "on",
    )
    why = None if offline else hub_unreachable(hub_id, "dataset")
    if why:
        raise SetupError(offline_message(hub_id, "dataset", why))
    try:
        import datasets

        return datasets.load_dataset(hub_id, split=split)
    except (
        Exception
    ) as e:  # offline machines raise ConnectionError, OSError or DatasetNotFoundError
        raise SetupError(offline_message(hub_id, "dataset", e)) from None
