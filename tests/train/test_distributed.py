"""Multi-process data parallel: 2 CPU processes (gloo) train what 1 process trains on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab.train import distributed, train
from peftlab.train.checkpoint import trainable_tensors
from peftlab.train.report import read_metrics
from peftlab.train.sampler import Sampler

from .common import collate, counting_rows
from .ddp_run import EVAL_ROWS, ROWS, ddp_args, eval_rows, two_adapter_llama

REPO = Path(__file__).resolve().parents[2]


def test_two_processes_train_what_one_process_trains(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "tests.train.ddp_run", str(tmp_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Meanwhile the same run in this process (one thread, as each of the two).
        model = two_adapter_llama()
        alone = train(model, counting_rows(ROWS), args=ddp_args(tmp_path / "alone"), collate_fn=collate,
                      eval_rows=eval_rows())
        expected = {k: t.detach() for k, t in trainable_tensors(model).items()}
        output = proc.communicate(timeout=180)[0].decode()  # ~25 s; longer means ranks wait for each other
    finally:
        if proc.poll() is None:
            proc.terminate()  # the launcher stops its workers
            proc.wait()
    assert proc.returncode == 0, output

    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    resumed = [load_file(tmp_path / f"rank{r}-resumed.safetensors") for r in (0, 1)]
    assert set(ranks[0]) == set(expected) and any(k.startswith("idle/") for k in expected)
    for key, want in expected.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key}: the ranks disagree"
        # Same rows, same (equal-length) label counts per rank: the averaged gradient is the 4-row gradient.
        torch.testing.assert_close(ranks[0][key], want, atol=1e-5, rtol=0, msg=f"{key}: 2 processes vs 1")
        assert torch.equal(resumed[0][key], ranks[0][key]) and torch.equal(resumed[1][key], ranks[1][key]), \
            f"{key}: the resumed run differs from the uninterrupted one"
    init = {k: t.detach() for k, t in trainable_tensors(two_adapter_llama()).items()}
    assert any(not torch.equal(ranks[0][k], init[k]) for k in init if k.startswith("default/")), "nothing trained"
    assert all(torch.equal(ranks[0][k], init[k]) for k in init if k.startswith("idle/")), \
        "the inactive adapter got no gradient; AdamW must skip it (a zero gradient would let weight decay shrink it)"

    logged = [e["loss"] for e in read_metrics(tmp_path / "full" / "metrics.jsonl") if e["event"] == "train"]
    assert logged == pytest.approx(alone.losses, abs=1e-5), "the logged loss is the mean over both ranks"

    # The evaluation is split: rank 0 scores rows 0-2, rank 1 rows 3-6 (2 rows per forward, as they
    # train), and the summed loss is the one-process loss over all 7.
    assert [json.loads((tmp_path / f"eval-rows-rank{r}.json").read_text()) for r in (0, 1)] == [[2, 1], [2, 2]]
    assert EVAL_ROWS == 7
    evals = [e for e in read_metrics(tmp_path / "full" / "metrics.jsonl") if e["event"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 3
    assert evals[0]["eval_loss"] == pytest.approx(alone.last_eval["eval_loss"], abs=1e-5)
    assert evals[0]["perplexity"] == pytest.approx(alone.last_eval["perplexity"], rel=1e-5)
    assert [e["loss"] for e in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == logged

    # A NaN on rank 1 stops both ranks at the same step, after rank 0 kept the last good state.
    stops = [json.loads((tmp_path / f"nan-rank{r}.json").read_text()) for r in (0, 1)]
    assert stops[0] == stops[1] == {"step": 4, "checkpoint": str(tmp_path / "nan" / "checkpoints" / "step-000003")}

    # Rank 0 wrote every output; rank 1 wrote nothing under either output dir.
    written = [json.loads((tmp_path / f"writes-rank{r}.json").read_text()) for r in (0, 1)]
    assert written[1] == []
    for name in ("metrics.jsonl", "loss.png", "README.md", "adapter/adapter_model.safetensors",
                 "checkpoints/.step-000003"):
        assert any(f"{tmp_path}/full/{name}" in w for w in written[0]), name
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == sorted(p.name for p in (tmp_path / "alone").iterdir())


def test_each_rank_takes_a_contiguous_share_of_the_global_batch():
    alone = Sampler(24, 6, seed=3)
    shares = [Sampler(24, 6, seed=3, rank=r, world_size=3) for r in range(3)]
    for k in range(9):  # across epochs: 4 micro-batches per epoch
        assert [i for s in shares for i in s.indices(k)] == alone.indices(k)
        assert all(len(s.indices(k)) == 2 for s in shares)


def test_a_batch_that_does_not_split_over_the_processes_is_an_error():
    with pytest.raises(ValueError, match=r"batch_size=5 is the global micro-batch, split evenly over 2 processes; "
                                         r"make it a multiple of 2 \(e.g. 6\)"):
        Sampler(16, 5, seed=0, rank=1, world_size=2)


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_sum([1.5, 3], torch.device("cpu")) == [1.5, 3]


def test_launch_refuses_inside_a_launched_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="drop --nproc when starting peftlab with torchrun"):
        distributed.launch(2, ["--model", "x"])


@pytest.mark.parametrize("n,world", [(7, 2), (2, 3), (10, 4), (5, 1)])
def test_the_eval_shards_are_the_rows_in_order_and_differ_by_at_most_one(n, world):
    rows = list(range(n))
    shares = [distributed.shard(rows, r, world) for r in range(world)]
    assert [x for share in shares for x in share] == rows
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_summing_the_shards_evaluations_gives_the_whole_evaluation():
    from peftlab.train import evaluate
    from peftlab.train.evaluation import eval_sums, metrics_from_sums

    model, rows = two_adapter_llama(), eval_rows()
    sums = [eval_sums(model, distributed.shard(rows, r, 3), collate, batch_size=2) for r in range(3)]
    whole = evaluate(model, rows, collate, batch_size=4)
    split = metrics_from_sums([sum(column) for column in zip(*sums)], len(rows))
    assert split == pytest.approx(whole, rel=1e-6)
    with pytest.raises(ValueError, match="hold no label"):
        metrics_from_sums(eval_sums(model, [], collate, batch_size=2), 0)
