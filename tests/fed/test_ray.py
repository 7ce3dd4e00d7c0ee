"""Flower's Ray-based simulation engine, end to end (Ray start-up makes this the slow one)."""

import numpy as np
import pytest

from peftlab.fed.spec import ServerSpec
from peftlab.fed.simulate import simulate

from .common import bert_task, rows


@pytest.mark.slow
def test_ray_simulation_matches_the_in_process_run():
    task = bert_task(steps=2)
    partitions = [rows(8, 0), rows(12, 1)]
    spec = ServerSpec(rounds=2, clients=2)
    lines = []
    on_ray = simulate(task, partitions, spec, eval_rows=rows(12, 99), backend="ray", cpus_per_client=1.0,
                      report=lines.append)
    in_process = simulate(task, partitions, spec, eval_rows=rows(12, 99), backend="in-process", report=lambda _: None)
    assert lines[2].startswith("round 2/2: 2/2 clients ok")
    # Same seeds, same messages: the workers compute what this process computes.
    for key in in_process.arrays:
        np.testing.assert_allclose(on_ray.arrays[key], in_process.arrays[key], rtol=1e-5, atol=1e-6)
    assert on_ray.traffic.to_dict() == in_process.traffic.to_dict()
