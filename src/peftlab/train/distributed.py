"""Multi-process data parallel training on ``torch.distributed``: one process per device.

``peftlab train --nproc N ...`` calls :func:`launch`, which starts ``torch.distributed.run`` (the
launcher behind ``torchrun``) with N copies of ``python -m peftlab.train ...``; starting those
with ``torchrun`` directly works the same. Each copy finds its rank in the environment that the
launcher sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``), and
:func:`~peftlab.train.train` does the rest:

* :func:`init_from_env` joins the process group: NCCL when the model is on CUDA (one GPU per
  process, ``cuda:LOCAL_RANK``), gloo on CPU;
* every rank holds the whole model; micro-batch k of ``batch_size`` rows (the global batch) is cut
  into ``world_size`` contiguous slices, one per rank (:class:`~peftlab.train.sampler.Sampler`);
* :func:`data_parallel` wraps the model in ``DistributedDataParallel``, which all-reduces (averages)
  the gradients of the parameters with ``requires_grad`` — the adapter tensors; the frozen base
  model is never communicated after the first broadcast;
* evaluation is split too: each rank scores a contiguous share of the eval rows (:func:`shard`)
  and the loss sums and counts are added over the ranks (:func:`all_sum`), so every rank gets the
  same metrics, equal to one process's up to summation order;
* rank 0 alone writes checkpoints, ``metrics.jsonl``, ``loss.png``, the model card and the adapter.

With one process (no ``WORLD_SIZE`` in the environment) the functions the loop calls are no-ops.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Number of processes training together (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank, 0 .. world_size() - 1 (the launcher's ``RANK`` before the group is joined)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on rank 0, the process that writes files and prints."""
    return rank() == 0


def init_from_env(device: str | torch.device | None = None) -> torch.device:
    """Join the process group described by the launcher's environment; return this rank's device.

    ``device`` is where the model is or will be: None picks CUDA when available, else the CPU.
    Under a launcher (``WORLD_SIZE`` > 1) a CUDA device becomes ``cuda:LOCAL_RANK`` (and the current
    device) and the backend is NCCL; on the CPU it is gloo. Without a launcher nothing happens.
    Calling it again is harmless, so callers may pick the device early (before loading the model)
    and :func:`~peftlab.train.train` calls it once more with the model's device.
    """
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        if "LOCAL_RANK" not in os.environ:
            raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but no LOCAL_RANK says which GPU is this "
                             f"process's; start the processes with torchrun or `peftlab train --nproc N`")
        local = int(os.environ["LOCAL_RANK"])
        if device.index not in (None, local):
            raise ValueError(f"this process has LOCAL_RANK={local} but the model is on {device}; every process "
                             f"trains on its own GPU: move the model to init_from_env() (cuda:{local}) instead")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)  # NCCL collectives and barriers run on the current device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (``model`` itself with one process): call it for the
    training forward; its backward averages the trainable gradients over the ranks.

    DDP reduces only parameters with ``requires_grad``, so the frozen base model costs one
    broadcast from rank 0 when wrapped (every rank then starts from rank 0's adapters) and nothing
    per step. ``find_unused_parameters=True`` because a trainable tensor may take no part in the
    forward — an adapter that is trainable but not active, or a layer a method skips — and DDP would
    otherwise wait for its gradient forever; the price is one walk over the autograd graph per
    forward, small next to the forward itself. Tensors no rank used keep ``grad=None``, so AdamW
    skips them as it does in one process. Buffers (rotary tables, ...) are not re-broadcast each
    forward: the base model is frozen and the same on every rank.
    """
    if world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=True, forward_sync_buffers=False)


def accumulating(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Enter around one micro-batch's forward and backward. ``sync=False`` (all micro-batches of a
    step but the last) keeps the gradients local, summing into ``.grad``; the last one's backward
    then averages the sums over the ranks in one all-reduce instead of one per micro-batch."""
    if sync or not isinstance(module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks, the same on every rank (``values`` itself with one process)."""
    if world_size() == 1:
        return list(values)
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)  # SUM: gloo has no AVG
    return summed.tolist()


def shard(rows: Sequence, index: int | None = None, count: int | None = None) -> Sequence:
    """Process ``index``'s contiguous share of ``rows`` among ``count`` (default: this rank's among
    the world): share r of W is ``rows[r·n//W : (r+1)·n//W]``, so the shares differ in size by at
    most one row and together are ``rows`` in order (``rows`` itself with one process)."""
    index = rank() if index is None else index
    count = world_size() if count is None else count
    if count == 1:
        return rows
    n = len(rows)
    return rows[index * n // count:(index + 1) * n // count]


def broadcast_metrics(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Rank 0's values of ``metrics`` on every rank (``metrics`` itself with one process).

    Every rank evaluates the same model on the same rows, but on GPUs the last bits may differ, and
    decisions taken on them (the best eval, early stopping) must agree or the ranks part ways.
    The keys must be the same on every rank; each value keeps its type.
    """
    if world_size() == 1:
        return metrics
    values = torch.tensor([float(v) for v in metrics.values()], dtype=torch.float64, device=device)
    dist.broadcast(values, src=0)
    return {k: type(v)(x) for (k, v), x in zip(metrics.items(), values.tolist())}


def barrier() -> None:
    """Wait until every rank gets here (no-op with one process)."""
    if world_size() > 1:
        dist.barrier()


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m peftlab.train *argv`` in ``nproc`` processes on this machine; return the exit code.

    ``argv`` are the ``peftlab train`` arguments without ``--nproc`` (the processes must not launch
    again). Each process gets ``cores / nproc`` CPU threads unless ``OMP_NUM_THREADS`` is set.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(f"already one of {os.environ['WORLD_SIZE']} processes started by torch.distributed; "
                           f"drop --nproc when starting peftlab with torchrun")
    env = dict(os.environ)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # torchrun's own default is 1
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "peftlab.train", *argv]
    proc = subprocess.Popen(command, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the launcher too (same process group); let it stop its workers, not orphan them.
        return proc.wait()


def shutdown() -> None:
    """Leave the process group, if this process joined one (NCCL warns at exit otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()
