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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a clean skip on a fresh clone that does not have it."""
    if not (SHARED_DATA / "paper").exists():
        pytest.skip(f"{SHARED_DATA} is absent (it ships beside the repo, not in it)")
    return SHARED_DATA
