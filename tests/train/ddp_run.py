"""The runs of tests/train/test_distributed.py, under ``torch.distributed.run`` (or in one process).

``python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.train.ddp_run OUT`` trains

* ``OUT/full``: 3 steps in one go, then an evaluation on ``EVAL_ROWS`` held-out rows, each rank
  scoring its share (it writes how many rows its eval forwards saw to ``OUT/eval-rows-rank{r}.json``);
* ``OUT/resumed``: 2 steps, then — from a differently initialised model — resumed to 3;
* ``OUT/nan``: rank 1's loss turns NaN at step 4, and each rank writes the error it raised
  (step and checkpoint) to ``OUT/nan-rank{r}.json``: all ranks must stop there, none may wait
  forever for the others,

and every rank saves its trained tensors to ``OUT/rank{r}.safetensors`` and
``OUT/rank{r}-resumed.safetensors``, and lists what it wrote under ``OUT/full`` and
``OUT/resumed`` in ``OUT/writes-rank{r}.json`` (seen through Python's audit hooks: every file
open for writing, mkdir, rename and removal).
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

from peftlab import LoraConfig
from peftlab.train import NonFiniteLossError, TrainArgs, distributed, train
from peftlab.train.checkpoint import trainable_tensors

from .common import collate, counting_rows, lora_llama

ROWS = 16
EVAL_ROWS = 7  # odd: the ranks' shares differ (3 and 4 rows)


def eval_rows():
    return counting_rows(EVAL_ROWS, seed=5, length=9)


def two_adapter_llama(seed=0):
    """LoRA "default" (active) and LoRA "idle" (trainable, never active: it gets no gradient, so
    AdamW must leave it alone — with weight decay on, a zero gradient instead of none would shrink its A)."""
    model = lora_llama(seed)
    model.add_adapter("idle", LoraConfig(r=4, target_modules=["q_proj"]))
    return model


def ddp_args(output_dir, steps=3):
    """Global batch 4 per micro-batch (2 rows per rank with 2 processes), 2 micro-batches per step."""
    return TrainArgs(output_dir=str(output_dir), steps=steps, batch_size=4, grad_accum=2, lr=1e-2, weight_decay=0.1,
                     progress=False)


def record_writes(roots, written):
    """Append to ``written`` each path under ``roots`` this process creates, writes, renames or removes."""
    roots = [os.path.abspath(r) for r in roots]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & write_flags)
            paths = [path] if writes else []
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            paths = [args[0]]
        elif event == "os.rename":  # os.rename and os.replace
            paths = list(args[:2])
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)) and any(
                    (os.path.abspath(os.fsdecode(p)) + os.sep).startswith(root + os.sep) for root in roots):
                written.append(f"{event} {os.fsdecode(p)}")

    sys.addaudithook(hook)


def main(out: str) -> None:
    rank, rows = distributed.rank(), counting_rows(ROWS)
    written = []
    record_writes([f"{out}/full", f"{out}/resumed"], written)

    model = two_adapter_llama()
    seen = []  # rows of each forward in eval mode
    model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: None if module.training else seen.append(len(kwargs["input_ids"])),
        with_kwargs=True)
    train(model, rows, args=ddp_args(f"{out}/full"), collate_fn=collate, eval_rows=eval_rows())
    with open(f"{out}/eval-rows-rank{rank}.json", "w") as f:
        json.dump(seen, f)
    save_file({k: t.detach().contiguous() for k, t in trainable_tensors(model).items()}, f"{out}/rank{rank}.safetensors")

    train(two_adapter_llama(), rows, args=ddp_args(f"{out}/resumed", steps=2), collate_fn=collate)
    model = two_adapter_llama(seed=1)  # everything trained must come from the checkpoint
    train(model, rows, args=ddp_args(f"{out}/resumed"), collate_fn=collate, resume=True)
    save_file({k: t.detach().contiguous() for k, t in trainable_tensors(model).items()},
              f"{out}/rank{rank}-resumed.safetensors")

    model = two_adapter_llama()
    if rank == 1:
        forwards = [0]

        def nan_from_forward_4(module, inputs, output):
            forwards[0] += 1
            return output * float("nan") if forwards[0] > 3 * 2 else output  # 2 micro-batches per step

        model.base_model.lm_head.register_forward_hook(nan_from_forward_4)
    try:
        train(model, rows, args=ddp_args(f"{out}/nan", steps=5), collate_fn=collate)
    except NonFiniteLossError as e:
        with open(f"{out}/nan-rank{rank}.json", "w") as f:
            json.dump({"step": e.step, "checkpoint": str(e.checkpoint)}, f)

    with open(f"{out}/writes-rank{rank}.json", "w") as f:
        json.dump(written, f, indent=1)
    distributed.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)  # as in the test process, whose one-process run this is compared with
    main(sys.argv[1])
