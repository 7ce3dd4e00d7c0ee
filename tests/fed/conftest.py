import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """The federated tests run many tiny forward/backward passes; on a loaded two-core machine two
    threads per op spend more time synchronising than computing (~10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
