"""Resuming: a run killed mid-way and resumed computes exactly what the uninterrupted run did."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from peftlab.train import latest_checkpoint, train
from peftlab.train.checkpoint import trainable_tensors
from peftlab.train.report import read_metrics

from .common import collate, counting_rows, lora_llama, resume_args

REPO = Path(__file__).resolve().parents[2]


def start_killable_run(output_dir):
    return subprocess.Popen([sys.executable, "-m", "tests.train.killed_run", str(output_dir), str(torch.get_num_threads())],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_when_logged(proc, output_dir, step, timeout=120):
    """SIGKILL the run once ``step`` is in its metrics.jsonl (it then waits there to be killed)."""
    deadline = time.monotonic() + timeout
    while step not in [e["step"] for e in read_metrics(output_dir / "metrics.jsonl")]:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}:\n{proc.stdout.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"step {step} not logged after {timeout} s")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path):
    proc = start_killable_run(tmp_path / "killed")  # starts up while the uninterrupted run trains here
    full_model = lora_llama()
    full = train(full_model, counting_rows(32), args=resume_args(tmp_path / "full"), collate_fn=collate)

    kill_when_logged(proc, tmp_path / "killed", step=5)
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "killed").name == "step-000004"

    model = lora_llama(seed=1)  # a different init: everything trained must come from the checkpoint
    resumed = train(model, counting_rows(32), args=resume_args(tmp_path / "killed"), collate_fn=collate, resume=True)

    assert len(full.losses) == 6 and resumed.losses[4:] == full.losses[4:], (resumed.losses, full.losses)
    assert resumed.losses == full.losses  # steps 1-4 come back from the checkpoint
    events = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4, 5, 6], "each step logged once"
    assert [e["loss"] for e in events] == full.losses
    for key, t in trainable_tensors(full_model).items():
        assert torch.equal(trainable_tensors(model)[key], t), key
