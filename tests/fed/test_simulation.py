"""Flower end to end, in this process: the same ServerApp, ClientApp and strategies as a Ray
simulation, with the in-process transport (no Ray start-up)."""

from functools import partial

import numpy as np
import pytest

from peftlab import IA3Config, LoHaConfig
from peftlab.fed.client import dropped_out, make_client_app
from peftlab.fed.comms import tensor_bytes
from peftlab.fed.local_grid import InProcessGrid, run_in_process
from peftlab.fed.server import FedResult, ServerSpec, make_server_app
from peftlab.fed.strategy import StrategyOptions
from peftlab.fed.task import to_numpy

from .common import bert_task, rows

SIZES = (8, 12, 20)  # rows per client: FedAvg weights 0.2, 0.3, 0.5


class RecordingGrid(InProcessGrid):
    """Keeps every (round, message, reply), as the server saw them. The round is read at sending
    time: strategies reuse one config record across rounds, and in-process nothing copies it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.exchanges = []
        self.uploads = []
        """(round, arrays, num-examples) of every successful reply, the arrays copied as sent (a DP
        wrapper clips replies in place)."""

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        self.exchanges += [(int(m.content["config"]["server-round"]), m, self._replies[i]) for m, i in zip(messages, ids)]
        self.uploads += [(round, _arrays(reply), reply.content["metrics"]["num-examples"])
                         for round, _, reply in self.exchanges[-len(ids):] if not reply.has_error()]
        return ids


def _rows_of(partitions, context):
    client = context.node_config["partition-id"]
    if partitions[client] is None:
        raise RuntimeError(f"client {client} crashed")
    return partitions[client]


def _run(task, partitions, rounds, *, options=StrategyOptions(), out=None, resume=False, seed=0, dropout=0.0):
    result = FedResult()
    spec = ServerSpec(rounds=rounds, clients=len(partitions), strategy=options, out=out, resume=resume, seed=seed)
    lines = []
    server = make_server_app(task, spec, eval_rows=rows(12, 99), result=result, report=lines.append)
    grid = RecordingGrid(make_client_app(task, partial(_rows_of, partitions), dropout=dropout), len(partitions))
    run_in_process(server, grid)
    return result, grid, lines


def _arrays(message):
    return {k: v.numpy() for k, v in next(iter(message.content.array_records.values())).items()}


def _by_round(grid):
    rounds = {}
    for round, message, reply in grid.exchanges:
        rounds.setdefault(round, []).append((message, reply))
    return rounds


def _weighted(replies):
    ok = [r for r in replies if not r.has_error()]
    weights = np.array([r.content["metrics"]["num-examples"] for r in ok], dtype=np.float64)
    shares = weights / weights.sum()
    states = [_arrays(r) for r in ok]
    return {k: sum(p * s[k].astype(np.float64) for p, s in zip(shares, states)) for k in states[0]}


ADAPTERS = {
    "lora": None,  # bert_task's default: LoRA r=4 on query, value
    "loha": LoHaConfig(r=2, alpha=2, target_modules=["query", "value"], task_type="SEQ_CLS"),
    "ia3": IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                     task_type="SEQ_CLS"),
}


@pytest.mark.parametrize("method", ADAPTERS)
def test_global_adapter_is_the_weighted_average_of_the_clients_and_bytes_add_up(method):
    task = bert_task(adapter=ADAPTERS[method])
    partitions = [rows(n, seed) for seed, n in enumerate(SIZES)]
    result, grid, lines = _run(task, partitions, rounds=2)
    by_round = _by_round(grid)
    adapter_bytes = tensor_bytes(to_numpy(task.new_model().adapter_state_dict()))
    for round, exchanges in by_round.items():
        replies = [r for _, r in exchanges]
        assert sorted(r.content["metrics"]["num-examples"] for r in replies) == list(SIZES)
        # The next global adapter: what round 2 was sent, or the final one.
        after = _arrays(by_round[2][0][0]) if round == 1 else result.arrays
        expected = _weighted(replies)
        assert set(after) == set(expected)
        for key in expected:
            np.testing.assert_allclose(after[key], expected[key], rtol=1e-5, atol=1e-7)
        # Bytes: exactly 2 × clients × adapter bytes per round, and what the tensors hold.
        entry = result.history[round]
        assert entry["down"] == entry["up"] == len(SIZES) * adapter_bytes
        assert entry["up"] == sum(tensor_bytes(_arrays(r)) for r in replies)
    assert result.traffic.total_down + result.traffic.total_up == 2 * 2 * len(SIZES) * adapter_bytes
    assert result.traffic.full_model_total == 2 * 2 * len(SIZES) * result.traffic.full_model_bytes
    assert [e["round"] for e in result.history] == [0, 1, 2]
    assert "accuracy" in result.history[2] and lines[2].startswith("round 2/2: 3/3 clients ok")


def test_a_client_that_raises_does_not_stop_the_round():
    task = bert_task(steps=2)
    partitions = [rows(8, 0), None, rows(20, 2)]  # client 1 crashes in every round: a third fail
    result, grid, lines = _run(task, partitions, rounds=2)
    for round, exchanges in _by_round(grid).items():
        replies = [r for _, r in exchanges]
        assert sum(r.has_error() for r in replies) == 1
        assert "client 1 crashed" in next(r for r in replies if r.has_error()).error.reason
        expected = _weighted(replies)
        after = _arrays(_by_round(grid)[2][0][0]) if round == 1 else result.arrays
        for key in expected:
            np.testing.assert_allclose(after[key], expected[key], rtol=1e-5, atol=1e-7)
        entry = result.history[round]
        assert (entry["clients"], entry["failed"]) == (3, 1)
        assert entry["up"] == 2 * entry["down"] // 3  # failed clients send nothing
    assert "(1 failed; first: RuntimeError: client 1 crashed)" in lines[1]


def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    task = bert_task(steps=2)
    partitions = [rows(8, 0), rows(12, 1)]
    options = StrategyOptions(name="fedadam", server_lr=0.05)  # server state (Adam moments) must survive too
    straight, _, _ = _run(task, partitions, rounds=3, options=options)
    _run(task, partitions, rounds=2, options=options, out=str(tmp_path))
    with pytest.raises(ValueError, match="pass --resume"):
        _run(task, partitions, rounds=3, options=options, out=str(tmp_path))
    resumed, grid, lines = _run(task, partitions, rounds=3, options=options, out=str(tmp_path), resume=True)
    assert lines[0].startswith("resuming from") and {r for r, _, _ in grid.exchanges} == {3}
    for key in straight.arrays:
        np.testing.assert_allclose(resumed.arrays[key], straight.arrays[key], rtol=1e-6, atol=1e-7)
    assert [e["round"] for e in resumed.history] == [0, 1, 2, 3]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "rounds").iterdir()) == ["round-000002", "round-000003"]


def test_stack_aggregation_grows_the_rank_and_keeps_the_frozen_part():
    task = bert_task(aggregation="stack", steps=2)
    partitions = [rows(8, 0), rows(12, 1)]
    result, grid, _ = _run(task, partitions, rounds=2, options=StrategyOptions(aggregation="stack"))
    r = task.adapter.r
    assert [e.get("rank") for e in result.history] == [None, r + 2 * r, r + 4 * r]
    by_round = _by_round(grid)
    sent = _arrays(by_round[2][0][0])  # the global after round 1, rank 3r
    for _, reply in by_round[2]:
        back = _arrays(reply)
        a_key = next(k for k in back if k.endswith("lora_A.weight"))
        assert back[a_key].shape[0] == r  # only the fresh directions come back
    final = result.arrays
    for key, value in sent.items():  # round 2 kept round 1's directions as they were
        if key.endswith("lora_A.weight"):
            np.testing.assert_array_equal(final[key][: 3 * r], value)
    # Downlink grows with the rank; uplink stays one rank-r adapter per client.
    assert result.history[2]["down"] > result.history[1]["down"]
    assert result.history[2]["up"] == result.history[1]["up"]


def _norm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in arrays.values())))


def test_central_dp_clips_each_update_and_adds_noise_of_the_stated_size():
    """Flower's server-side fixed clipping: global + Σ p_i · clip(update_i, C) + N(0, (σ·C / sampled)²)."""
    task = bert_task(steps=2)
    partitions = [rows(8, 0), rows(12, 1)]
    clip = 0.05
    np.random.seed(0)  # Flower draws the noise from numpy's global generator
    quiet, grid, _ = _run(task, partitions, rounds=1, options=StrategyOptions(dp_noise=1e-9, dp_clip=clip))
    start = _arrays(grid.exchanges[0][1])  # the global adapter the clients were sent
    updates = [{k: v.astype(np.float64) - start[k] for k, v in arrays.items()} for _, arrays, _ in grid.uploads]
    shares = np.array([n for _, _, n in grid.uploads]) / 20
    assert all(_norm(u) > 2 * clip for u in updates)  # so clipping changes something
    clipped = [{k: v * min(1.0, clip / _norm(u)) for k, v in u.items()} for u in updates]
    expected = {k: start[k] + sum(p * c[k] for p, c in zip(shares, clipped)) for k in start}
    for key in expected:
        np.testing.assert_allclose(quiet.arrays[key], expected[key], rtol=0, atol=1e-6)
    assert _norm({k: quiet.arrays[k] - start[k] for k in start}) <= clip * (1 + 1e-5)

    noisy, _, _ = _run(task, partitions, rounds=1, options=StrategyOptions(dp_noise=1.0, dp_clip=clip))
    noise = np.concatenate([(noisy.arrays[k] - expected[k]).ravel() for k in expected])  # training is seeded
    sigma = 1.0 * clip / len(partitions)
    assert noise.size > 1000  # the standard deviation's estimate is within ~2 % (1 / √(2n)): 0.1 is 4.7 of those
    assert abs(noise.std() / sigma - 1) < 0.1 and abs(noise.mean()) < 5 * sigma / np.sqrt(noise.size)


def test_a_round_with_30_percent_of_the_clients_dropping_out_completes():
    clients, rate = 10, 0.3
    # The first run seed whose round 1 loses exactly 3 of the 10 clients (dropout is a function of the seed).
    seed = next(s for s in range(1000) if sum(dropped_out(s, 1, c, rate) for c in range(clients)) == 3)
    task = bert_task(steps=1)
    partitions = [rows(4 + c, c) for c in range(clients)]  # unequal sizes: the weights matter
    result, grid, lines = _run(task, partitions, rounds=2, seed=seed, dropout=rate)
    by_round = _by_round(grid)
    for round in (1, 2):
        replies = [reply for _, reply in by_round[round]]
        failed = {int(r.error.reason.split("client ")[1].split()[0]) for r in replies if r.has_error()}
        assert failed == {c for c in range(clients) if dropped_out(seed, round, c, rate)}
        assert len(failed) < clients
        expected = _weighted(replies)
        after = _arrays(by_round[2][0][0]) if round == 1 else result.arrays
        for key in expected:
            np.testing.assert_allclose(after[key], expected[key], rtol=1e-5, atol=1e-7)
        assert (result.history[round]["clients"], result.history[round]["failed"]) == (clients, len(failed))
    assert lines[1].startswith("round 1/2: 7/10 clients ok") and "dropped out of round 1 (simulated" in lines[1]


def test_only_sampled_clients_train_and_a_resumed_run_samples_the_same(tmp_path):
    task = bert_task(steps=1)
    partitions = [rows(6 + 2 * c, c) for c in range(4)]
    options = StrategyOptions(fraction=0.5)
    straight, grid, lines = _run(task, partitions, rounds=3, options=options)
    adapter_bytes = tensor_bytes(to_numpy(task.new_model().adapter_state_dict()))
    by_round = _by_round(grid)
    samples = {round: sorted(m.metadata.dst_node_id for m, _ in ex) for round, ex in by_round.items()}
    assert sorted(samples) == [1, 2, 3] and all(len(nodes) == 2 for nodes in samples.values())
    assert len({tuple(nodes) for nodes in samples.values()}) > 1  # a new draw each round
    for round, exchanges in by_round.items():
        after = _arrays(by_round[round + 1][0][0]) if round < 3 else straight.arrays
        expected = _weighted([r for _, r in exchanges])
        for key in expected:
            np.testing.assert_allclose(after[key], expected[key], rtol=1e-5, atol=1e-7)
        entry = straight.history[round]  # two clients, each sent the adapter and sending it back
        assert (entry["clients"], entry["down"], entry["up"]) == (2, 2 * adapter_bytes, 2 * adapter_bytes)
    assert lines[1].startswith("round 1/3: 2/2 clients ok")

    _run(task, partitions, rounds=2, options=options, out=str(tmp_path))
    resumed, again, _ = _run(task, partitions, rounds=3, options=options, out=str(tmp_path), resume=True)
    assert sorted(m.metadata.dst_node_id for _, m, _ in again.exchanges) == samples[3]
    for key in straight.arrays:
        np.testing.assert_allclose(resumed.arrays[key], straight.arrays[key], rtol=1e-6, atol=1e-7)


def test_fedprox_sends_mu_and_the_clients_add_the_proximal_term():
    task = bert_task(steps=2)
    partitions = [rows(8, 0), rows(12, 1)]
    plain, _, _ = _run(task, partitions, rounds=1)
    prox, grid, _ = _run(task, partitions, rounds=1, options=StrategyOptions(name="fedprox", proximal_mu=5.0))
    assert [float(m.content["config"]["proximal-mu"]) for _, m, _ in grid.exchanges] == [5.0, 5.0]
    # The pull toward the global adapter (tested in value in test_task.py) keeps the clients closer to it.
    start = _arrays(grid.exchanges[0][1])
    assert _norm({k: prox.arrays[k] - start[k] for k in start}) < _norm({k: plain.arrays[k] - start[k] for k in start})


def test_failure_reasons_are_cut_to_the_clients_message():
    from peftlab.fed.server import short_reason

    ray_reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=1)\n"
                  "  File ..., line 65, in run\nflwr.clientapp.client_app.ClientAppException: \n"
                  "Exception ClientAppException occurred. Message: client 3 dropped out of round 2'>")
    assert short_reason(ray_reason) == "client 3 dropped out of round 2"
    assert short_reason("RuntimeError: client 1\n crashed") == "RuntimeError: client 1 crashed"
