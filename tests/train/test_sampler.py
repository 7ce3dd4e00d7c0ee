"""The sampler: micro-batch k is a function of (seed, k) alone; each epoch is a permutation."""

import pytest

from peftlab.train.sampler import Sampler


def test_each_epoch_is_a_permutation_and_epochs_differ():
    s = Sampler(12, 4, seed=0)
    epochs = [[i for k in range(3 * e, 3 * e + 3) for i in s.indices(k)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(12))
    assert epochs[0] != epochs[1] != epochs[2]


def test_indices_depend_only_on_seed_and_index():
    forward = [Sampler(10, 3, seed=5).indices(k) for k in range(9)]
    s = Sampler(10, 3, seed=5)
    backward = [s.indices(k) for k in reversed(range(9))][::-1]  # jumping between epochs, as a resume does
    assert forward == backward
    assert all(len(set(b)) == 3 for b in forward)
    assert Sampler(10, 3, seed=6).indices(0) != forward[0]


def test_fewer_rows_than_a_batch_is_an_error():
    with pytest.raises(ValueError, match="3 training rows but batch_size=8; lower batch_size to at most 3"):
        Sampler(3, 8, seed=0)
