"""Shared pytest setup: files holding a slow test run first; GPU tests are skipped without CUDA."""
from collections import Counter

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # Under pytest-xdist's --dist loadfile (the README's test command) a long file handed out
    # last keeps one worker busy after the others ran out of files; handed out first, it
    # overlaps with the short ones. Most slow tests first; the sort is stable.
    slow_tests = Counter(item.path for item in items if "slow" in item.keywords)
    items.sort(key=lambda item: -slow_tests[item.path])
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
