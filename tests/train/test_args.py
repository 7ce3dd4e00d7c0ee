"""TrainArgs validation: each bad value names the field, the value and the fix."""

import dataclasses

import pytest

from peftlab.train import TrainArgs


def test_defaults_are_valid_and_frozen():
    args = TrainArgs()
    assert args.to_dict()["steps"] == 100
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.steps = 3


@pytest.mark.parametrize("changes, message", [
    (dict(steps=0), r"TrainArgs.steps must be an integer >= 1, got 0"),
    (dict(grad_accum=1.5), r"TrainArgs.grad_accum must be an integer >= 1, got 1.5"),
    (dict(eval_every=-1), r"TrainArgs.eval_every must be an integer >= 0 .*got -1"),
    (dict(lr=float("nan")), r"TrainArgs.lr must be a finite number > 0, got nan"),
    (dict(weight_decay=-0.1), r"TrainArgs.weight_decay must be >= 0, got -0.1"),
    (dict(max_grad_norm=0.0), r"TrainArgs.max_grad_norm must be > 0 or None \(no clipping\), got 0.0"),
    (dict(schedule="exp"), r"TrainArgs.schedule must be one of \('constant', 'linear', 'cosine'\), got 'exp'"),
    (dict(precision="int8"), r"TrainArgs.precision must be one of .*got 'int8'"),
    (dict(steps=10, warmup_steps=20), r"TrainArgs.warmup_steps=20 exceeds steps=10; use at most steps"),
    (dict(early_stopping_patience=3), r"TrainArgs.early_stopping_patience=3 needs .* set eval_every > 0"),
    (dict(save_every=5), r"TrainArgs.save_every=5 needs somewhere to write checkpoints; set output_dir"),
])
def test_invalid_values_are_named_with_a_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainArgs(**changes)
