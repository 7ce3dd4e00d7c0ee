"""Training arguments: one frozen dataclass, validated at construction, JSON round-trip."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainArgs:
    """Everything :func:`peftlab.train.train` needs besides the model and the data."""

    output_dir: str | None = None
    """Where ``adapter/``, ``checkpoints/``, ``metrics.jsonl``, ``loss.png`` and ``README.md`` go.
    None writes nothing (no checkpoints, so no resuming)."""
    steps: int = 100
    """Optimizer steps to run in total (a resumed run counts the steps before the checkpoint)."""
    batch_size: int = 8
    """Rows per micro-batch (one forward/backward)."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed before each optimizer step; the effective batch is
    ``batch_size * grad_accum`` rows."""
    lr: float = 1e-3
    """Peak learning rate of AdamW (reached after the warmup)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the adapter parameters."""
    warmup_steps: int = 0
    """Steps over which the learning rate rises linearly from ``lr / warmup_steps`` to ``lr``."""
    schedule: str = "constant"
    """Learning rate after the warmup: "constant", or decaying towards 0 at ``steps`` along a line
    ("linear") or half a cosine ("cosine")."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm of the adapter parameters to this; None = no clipping."""
    seed: int = 0
    """Seeds Python, NumPy and torch at the start, and the order of the training rows."""
    eval_every: int = 0
    """Evaluate on the eval rows every this many steps; 0 = only after the last step."""
    eval_batches: int = 0
    """Micro-batches of eval rows per evaluation; 0 = all of them."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations in a row without a lower eval_loss; 0 = never stop early.
    Needs ``eval_every`` > 0 and eval rows."""
    save_every: int = 0
    """Write a checkpoint every this many steps; 0 = only after the last step. Needs ``output_dir``."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep on disk; older ones are deleted."""
    gradient_checkpointing: bool = False
    """Recompute the base model's layer activations during backward instead of storing them:
    less memory, about a third more compute. Works with every method (the recomputation sees the
    route of the original forward). It stays on after training; it only acts in training mode."""
    lean_loss: bool = True
    """Compute the training loss of a causal LM from its labelled positions only, a chunk of them at
    a time through the output head, so the (batch, length, vocabulary) logits are never stored: the
    same loss and gradients in less memory and time (``PeftModel.lean_loss``). Models it does not fit
    (classifiers, encoder-decoders, soft-capped logits) train as usual. Evaluation keeps its logits."""
    keep_freed_memory: bool = True
    """On the CPU (glibc): keep freed memory in the C heap for the next step instead of mapping
    fresh pages every step (:func:`peftlab.runtime.keep_freed_memory`; a process-wide malloc
    setting). On this project's 2-core machine it removed most of 70k–190k page faults per step and
    3–10 % of a SmolLM2 step's time (LoRA 3 %, LoHa about 10 %), for up to 2 % more peak RSS."""
    precision: str = "fp32"
    """"fp32", or "bf16"/"fp16" autocast (CUDA only; fp16 adds a gradient scaler). Adapter weights
    and optimizer state stay fp32 either way."""
    log_every: int = 1
    """Append the mean training loss to ``metrics.jsonl`` every this many steps (and at the last)."""
    progress: bool = True
    """Show a progress bar with loss, tokens/s and the time left."""

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainArgs.{name} must be an integer >= 1, got {value!r}")
        non_negative = ("warmup_steps", "seed", "eval_every", "eval_batches", "early_stopping_patience", "save_every")
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainArgs.{name} must be an integer >= 0 (0 = off or default), got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainArgs.lr must be a finite number > 0, got {self.lr!r}; adapters usually train "
                             f"well at 1e-4 to 1e-3 (LoRA) or 1e-2 to 3e-1 (prompt tuning)")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"TrainArgs.weight_decay must be >= 0, got {self.weight_decay!r}; use 0.0 for none")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0):
            raise ValueError(f"TrainArgs.max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainArgs.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainArgs.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"TrainArgs.warmup_steps={self.warmup_steps} exceeds steps={self.steps}; "
                             f"use at most steps (typically 5-10 % of them)")
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError(f"TrainArgs.early_stopping_patience={self.early_stopping_patience} needs evaluations "
                             f"during training; set eval_every > 0 too")
        if self.save_every and self.output_dir is None:
            raise ValueError(f"TrainArgs.save_every={self.save_every} needs somewhere to write checkpoints; "
                             f"set output_dir")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
