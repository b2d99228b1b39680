import os

import pytest
import torch

# Two cores: keep intra-op threads at what the machine has, and results repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _keep_threads():
    """Training runs set their own thread count (--threads): each test starts with the suite's."""
    from vitkit.fast import set_num_threads

    n = torch.get_num_threads()
    yield
    set_num_threads(n)  # only if it changed: torch's setter also pins MKL's threading (see its docstring)
