import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread: their ops are too small to split, and on a busy
    machine extra threads mostly wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
