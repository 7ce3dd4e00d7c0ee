"""The training loop, readable top to bottom.

AdamW over the trained adapter tensors only: the frozen base gets no gradients and no optimizer
state. Each optimizer step

1. sets the learning rate of the schedule (a closed form of the step, see :func:`lr_factor`);
2. runs ``grad_accum`` micro-batches of ``batch_size`` rows, drawn by :class:`Sampler` from
   (seed, micro-batch index). Each micro-batch's loss is divided by ``grad_accum`` before backward,
   so the step's gradient is the mean of the micro-batch means. When micro-batches hold different
   numbers of label tokens that is a mean of means, not the mean over all the step's tokens — the
   same as Hugging Face Trainer's default;
3. stops on a non-finite loss (:class:`NonFiniteLossError`) before it can touch the weights;
4. clips the gradient norm and steps AdamW;
5. logs, evaluates (with early stopping) and checkpoints when due.

The data position of a checkpoint is its step (micro-batch index = step * grad_accum), and the
checkpoint holds the adapter and optimizer tensors and every RNG state, so a resumed run computes
what the uninterrupted run would have: the same losses, bit for bit on the same machine.

Started by a launcher (``peftlab train --nproc N``, ``torchrun``), N processes run this same loop
(:mod:`.distributed`): each micro-batch of ``batch_size`` rows is split evenly over them, the
forward goes through ``DistributedDataParallel`` so that the gradients are averaged over the
processes before the step, and rank 0 alone writes files. Each process's loss is the mean over its
own label tokens, so the averaged gradient is the one-process gradient of the whole micro-batch
when every process holds as many label tokens — the same condition as for gradient accumulation.
Every process seeds its RNGs with ``seed`` (dropout masks repeat across processes), and a
checkpoint holds rank 0's RNG states, which every process restores on resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import runtime
from . import distributed
from .args import TrainArgs
from .checkpoint import capture_rng, latest_checkpoint, load_checkpoint, save_checkpoint, trainable_tensors
from .evaluation import eval_sums, first_batches, metrics_from_sums
from .report import MetricsLog, plot_losses, read_metrics, write_model_card
from .sampler import Sampler


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the weights were not updated with it."""

    def __init__(self, message: str, *, step: int, value: float, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.value, self.checkpoint = step, value, checkpoint


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    """Training loss of every optimizer step (the mean over its micro-batches), from step 1 — in a
    resumed run, the steps before the checkpoint too."""
    seconds: float = 0.0
    """Wall time of training and evaluation, summed over resumed sessions."""
    tokens: int = 0
    """Tokens trained on (ones in the attention masks)."""
    best_eval: dict[str, Any] | None = None
    """The evaluation with the lowest eval_loss, with its ``"step"``."""
    last_eval: dict[str, Any] | None = None
    """The latest evaluation, with its ``"step"``."""
    stopped_early: bool = False
    final_step: int = 0
    """Optimizer steps done."""


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier on the peak learning rate at optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup``, then ``1`` (constant), ``1 - p`` (linear) or
    ``(1 + cos(pi p)) / 2`` (cosine), where ``p = (step - warmup) / (steps - warmup)``.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}; use 'constant', 'linear' or 'cosine'")


def train(
    model: torch.nn.Module,
    train_rows: Sequence[dict],
    *,
    args: TrainArgs,
    collate_fn: Callable[[list[dict]], dict[str, torch.Tensor]],
    eval_rows: Sequence[dict] | None = None,
    resume: bool = False,
    tokenizer: Any = None,
    generation_eval: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    data_summary: str | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    command: str | None = None,
) -> TrainResult:
    """Train the trainable adapters of ``model`` (a :class:`~peftlab.PeftModel`) for ``args.steps`` steps.

    Args:
        train_rows: encoded rows; ``collate_fn(list_of_rows)`` turns a micro-batch of them into the
            model's keyword arguments (``input_ids``, ``attention_mask``, ``labels``, ...).
        eval_rows: rows for :func:`~peftlab.train.evaluate`, every ``args.eval_every`` steps and
            after the last.
        resume: continue from the newest checkpoint in ``args.output_dir`` (from step 0 if there is
            none yet). Without it, an output_dir that holds checkpoints is an error.
        tokenizer: saved next to the final adapter when given.
        generation_eval: ``fn(model) -> {"exact_match": ...}``, run at each evaluation (e.g. greedy
            answers scored against references); its metrics join the eval event.
        data_summary: one line about the data, for the model card.
        on_log: called with every event written to ``metrics.jsonl`` (``{"event": "train"|"eval",
            "step": ..., ...}``); with several processes, on rank 0 only.
        command: the command line that started the run, for the model card.

    With ``args.output_dir`` set, writes ``checkpoints/step-NNNNNN/`` (every ``save_every`` steps and
    after the last), ``metrics.jsonl`` as it goes, and at the end ``adapter/``, ``loss.png`` and
    ``README.md`` (the model card); with several processes, rank 0 writes them all. Leaves the model
    in eval mode.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the newest good state is checkpointed first.
    """
    out = Path(args.output_dir) if args.output_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs TrainArgs.output_dir: the directory whose checkpoints to continue from")
    if args.early_stopping_patience and not eval_rows:
        raise ValueError(f"TrainArgs.early_stopping_patience={args.early_stopping_patience} watches eval_loss; "
                         f"pass eval_rows, or set early_stopping_patience=0")
    params = trainable_tensors(model)
    if not params:
        raise ValueError("the model has no trainable parameters; was the adapter loaded with is_trainable=False?")
    adapters = sorted({key.split("/", 1)[0] for key in params})
    parameter_counts = model.trainable_parameters()
    # Under a launcher: join the process group (this process's rank and device); alone: nothing.
    device = distributed.init_from_env(next(model.parameters()).device)
    main, world = distributed.is_main(), distributed.world_size()  # main: rank 0, which writes the files
    autocast = _autocast(args.precision, device)
    if args.keep_freed_memory and device.type == "cpu":
        runtime.keep_freed_memory()
    optimizer = torch.optim.AdamW(list(params.values()), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")  # a no-op unless fp16
    sampler = Sampler(len(train_rows), args.batch_size, args.seed, rank=distributed.rank(), world_size=world)
    if args.gradient_checkpointing:
        # Non-reentrant checkpointing, so a frozen embedding (inputs without grad) is fine.
        model.gradient_checkpointing_enable()

    # Seed everything, then — when resuming — put back the checkpoint's tensors and RNG states.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    result, bad_evals = TrainResult(), 0  # bad_evals: evaluations in a row without a lower eval_loss
    checkpoint = latest_checkpoint(out) if out is not None else None
    if checkpoint is not None and not resume:
        raise ValueError(f"{out} already holds checkpoints of a run (newest: {checkpoint.name}); pass resume=True "
                         f"(--resume) to continue it, or choose a new output_dir")
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint, model=model, optimizer=optimizer)
        _check_same_data(saved, args, len(train_rows), checkpoint)
        result, bad_evals = TrainResult(**saved["result"]), saved["bad_evals"]
        if scaler.is_enabled() and saved["grad_scaler"]:
            scaler.load_state_dict(saved["grad_scaler"])
    step = saved_step = result.final_step  # optimizer steps done; the newest step on disk
    log = MetricsLog(out / "metrics.jsonl") if out is not None and main else None
    if log is not None:
        log.keep_until(step)  # a resumed run rewrites what came after its checkpoint

    def emit(event: dict[str, Any]) -> None:
        if not main:  # one copy of each event; its numbers are already averaged over the processes
            return
        if log is not None:
            log.append(event)
        if on_log is not None:
            on_log(event)

    def checkpoint_now(rng: dict | None = None) -> None:
        if not main:  # every process holds the same tensors; one writes them
            return
        state = {"result": dataclasses.asdict(result), "bad_evals": bad_evals, "args": args.to_dict(),
                 "n_rows": len(train_rows), "grad_scaler": scaler.state_dict()}
        save_checkpoint(out, step, model=model, optimizer=optimizer, trainer_state=state, rng=rng,
                        keep=args.keep_checkpoints)

    forward = distributed.data_parallel(model, device)  # the model itself in one process
    session_start, seconds_before, session_tokens = time.perf_counter(), result.seconds, 0
    window_losses, window_tokens, window_start = [], 0, time.perf_counter()  # since the last train event
    bar = tqdm(total=args.steps, initial=step, desc="training", disable=not (args.progress and main), dynamic_ncols=True)
    if checkpoint is not None and args.progress and main:
        tqdm.write(f"resuming from {checkpoint} (step {step})")
    model.train()
    try:
        while step < args.steps and not result.stopped_early:
            rng_at_start = capture_rng() if out is not None else None  # to checkpoint this moment on NaN
            lr = args.lr * lr_factor(step, args.steps, args.warmup_steps, args.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr

            step_loss, step_tokens = 0.0, 0
            for k in range(args.grad_accum):
                indices = sampler.indices(step * args.grad_accum + k)  # this process's rows
                batch = {key: v.to(device) for key, v in collate_fn([train_rows[i] for i in indices]).items()}
                with distributed.accumulating(forward, sync=k == args.grad_accum - 1):
                    with autocast, model.lean_loss(args.lean_loss):  # the loss alone: no logits needed
                        loss = forward(**batch).loss
                    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                    # Every process learns the mean loss before backward, so all of them stop on a NaN anywhere.
                    loss_sum, tokens = distributed.all_sum([loss.item(), tokens], device)
                    micro_loss = loss_sum / world
                    if not math.isfinite(micro_loss):
                        good = None
                        if out is not None:  # make sure the state before this step is on disk
                            if step > saved_step:
                                checkpoint_now(rng_at_start)
                            distributed.barrier()  # before any process exits: the launcher then stops them all
                            good = latest_checkpoint(out)
                        where = f"rows {indices}" + (f" on rank {distributed.rank()}, whose own loss is {loss.item()}"
                                                     if world > 1 else "")
                        raise NonFiniteLossError(
                            f"training loss is {micro_loss} at step {step + 1} (micro-batch {k + 1} of "
                            f"{args.grad_accum}, {where}); the weights were not updated with it. Last good "
                            f"checkpoint: {good or 'none (set output_dir to keep one)'}. Fix: lower the learning "
                            f"rate (now {args.lr:g}), keep max_grad_norm set, prefer bf16 to fp16, or check those "
                            f"rows (a row without label tokens has no loss)",
                            step=step + 1, value=micro_loss, checkpoint=good)
                    scaler.scale(loss / args.grad_accum).backward()  # averaged over the processes on the last
                step_loss += micro_loss / args.grad_accum
                step_tokens += int(tokens)
            scaler.unscale_(optimizer)  # clip the true gradients, not fp16-scaled ones
            if args.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(params.values()), args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            result.losses.append(step_loss)
            result.tokens += step_tokens
            result.final_step = step
            result.seconds = seconds_before + time.perf_counter() - session_start
            session_tokens += step_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{session_tokens / (time.perf_counter() - session_start):.0f}")

            window_losses.append(step_loss)
            window_tokens += step_tokens
            if step % args.log_every == 0 or step == args.steps:
                now = time.perf_counter()
                emit({"event": "train", "step": step, "loss": sum(window_losses) / len(window_losses), "lr": lr,
                      "tokens_per_s": window_tokens / max(now - window_start, 1e-9)})
                window_losses, window_tokens, window_start = [], 0, now

            if (eval_rows or generation_eval) and (args.eval_every and step % args.eval_every == 0 or step == args.steps):
                metrics = _evaluate(model, eval_rows, collate_fn, args, autocast, generation_eval, device)
                result.last_eval = {"step": step, **metrics}
                emit({"event": "eval", **result.last_eval})
                if "eval_loss" in metrics:
                    if result.best_eval is None or metrics["eval_loss"] < result.best_eval["eval_loss"]:
                        result.best_eval, bad_evals = result.last_eval, 0
                    else:
                        bad_evals += 1
                    result.stopped_early = 0 < args.early_stopping_patience <= bad_evals

            if out is not None and (args.save_every and step % args.save_every == 0 or step == args.steps
                                    or result.stopped_early):
                checkpoint_now()
                saved_step = step
    finally:
        bar.close()
    model.eval()

    if out is not None and main:
        model.save_pretrained(out / "adapter", selected_adapters=adapters)
        if tokenizer is not None:
            tokenizer.save_pretrained(out / "adapter")
        evals = [(e["step"], e["eval_loss"]) for e in read_metrics(out / "metrics.jsonl")
                 if e["event"] == "eval" and "eval_loss" in e]
        plot_losses(result.losses, out / "loss.png", evals=evals)
        write_model_card(out / "README.md", model=model, adapters=adapters, args=args, result=result,
                         parameters=parameter_counts, data_summary=data_summary, command=command)
    distributed.barrier()  # every process returns once the outputs are on disk
    return result


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError(f"precision={precision!r}: autocast on {device.type} is not supported here; "
                         f"use precision='fp32', or move the model to a CUDA device")
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _evaluate(model, eval_rows, collate_fn, args: TrainArgs, autocast, generation_eval, device) -> dict[str, Any]:
    """Eval loss/perplexity/accuracy on ``eval_rows`` plus the caller's generation metrics, the
    same on every process: each scores its share of the rows (as many per forward as it trains on)
    and the sums are added over the processes; the generation metrics are rank 0's."""
    metrics: dict[str, Any] = {}
    if eval_rows:
        rows = first_batches(eval_rows, args.batch_size, args.eval_batches)
        per_forward = max(1, args.batch_size // distributed.world_size())
        sums = eval_sums(model, distributed.shard(rows), collate_fn, batch_size=per_forward, autocast=autocast)
        metrics.update(metrics_from_sums(distributed.all_sum(sums, device), len(rows)))
    if generation_eval is not None:
        model.eval()
        # Every process generates; rank 0's numbers are adopted, so decisions taken on them agree.
        metrics.update(distributed.broadcast_metrics(generation_eval(model), device))
    model.train()
    return metrics


def _check_same_data(saved: dict[str, Any], args: TrainArgs, n_rows: int, checkpoint: Path) -> None:
    """A checkpoint's data position (its step) means the same rows only with the same sampling."""
    now = {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "seed": args.seed, "n_rows": n_rows}
    then = {**{k: saved["args"][k] for k in ("batch_size", "grad_accum", "seed")}, "n_rows": saved["n_rows"]}
    changed = {k: (then[k], now[k]) for k in now if then[k] != now[k]}
    if changed:
        described = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        raise ValueError(f"cannot resume from {checkpoint}: {described} since it was written, so its data position "
                         f"would point at other rows; resume with the same training rows, batch_size, grad_accum "
                         f"and seed, or start a new output_dir")
