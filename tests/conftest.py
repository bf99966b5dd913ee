"""Shared test set-up. Real data comes from $DL_DATA (CI sets it to ../shared/data); without it, tests that
need it fall back to small fixtures of their own, so the suite runs anywhere."""
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts are flat files at the top of the repo, imported as modules

try:  # two threads on two cores; more only oversubscribes them
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))
except ImportError:
    pass


def real_data_path(part):
    """$DL_DATA/part, or None when $DL_DATA is unset. A set $DL_DATA without that part is an error, not a
    skip: CI must not pass by quietly testing nothing."""
    root = os.environ.get("DL_DATA")
    if not root:
        return None
    path = pathlib.Path(root) / part
    if not path.exists():
        raise FileNotFoundError(f"DL_DATA={root} has no {part}/ (see data/README.md)")
    return path


@pytest.fixture
def news_dir():
    return real_data_path("news")


@pytest.fixture
def porter_dir():
    return real_data_path("porter")
