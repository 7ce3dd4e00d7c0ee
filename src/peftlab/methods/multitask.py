"""Multitask prompt tuning (Wang et al. 2023, https://arxiv.org/abs/2303.02861).

One prompt shared by K tasks, modulated per task by a rank-r product; each row of a batch names
its task with ``task_ids`` (B,):

    P_k = P ⊙ (U_k V_k)       P: (N, d) shared        U: (K, N, r) ``prefix_task_cols``
                              V: (K, r, d) ``prefix_task_rows``      row b gets P_{task_ids[b]}

N = n · blocks, blocks = 2 for encoder-decoder models: Hugging Face PEFT sends this method down
its generic seq2seq path, which puts rows 0..n-1 in front of the encoder input and rows n..2n-1
in front of the decoder input (prompt tuning and P-tuning use the encoder only); we do the same.
One adapter file holds every task: ``prompt_embeddings`` (P), ``prefix_task_cols``,
``prefix_task_rows`` — PEFT's names and layout.

Initialisation. P: "random" (N(0, 1)), "vocab" or "text" as prompt tuning does; U, V ~ N(0, 0.02²)
as in PEFT, so P_k starts near zero. The paper's recipe is to train on source tasks first and
start target tasks from the result; ``init_adapter_path`` names that source, an adapter directory
(either format, safetensors only), read when the adapter is created:

* "from_prompt" — P from a single-task prompt-tuning adapter (or any adapter with a
  ``prompt_embeddings`` of the same shape); U, V random. PEFT's ONLY_SOURCE_SHARED.
* "from_task" — P, U, V from task ``init_task`` of a multitask adapter, copied into every task
  here. PEFT's EXACT_SOURCE_TASK (which only accepts num_tasks=1 here).
* "from_average" — likewise with U, V averaged over the source's tasks. PEFT's AVERAGE_SOURCE_TASKS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import AdapterConfig, ConfigError, HFMapping, register
from ..formats import AdapterLoadError, read_adapter
from ..prompts import PROMPT_KEY_PREFIX
from .prompt import PromptEmbedding, num_submodules

_INITS = ("random", "vocab", "text", "from_prompt", "from_task", "from_average")
_FROM_SOURCE = ("from_prompt", "from_task", "from_average")
_UV_STD = 0.02  # PEFT's initial scale of U and V


@dataclass(frozen=True)
class MultitaskPromptConfig(AdapterConfig):
    """Configuration of a multitask prompt-tuning adapter (every task in one adapter)."""

    method = "multitask"

    num_virtual_tokens: int = 20
    """Virtual tokens n per stack (encoder, and decoder for seq2seq models)."""
    num_tasks: int = 1
    """Tasks K; forwards pass ``task_ids`` with values in 0..K-1, one per row."""
    num_ranks: int = 1
    """Rank r of each task's modulation U_k V_k (the paper uses 1)."""
    prompt_tuning_init: str = "random"
    """How to start: "random", "vocab", "text", "from_prompt", "from_task" or "from_average"."""
    init_adapter_path: str | None = None
    """Adapter directory the "from_*" inits read (read again whenever this config creates an adapter)."""
    init_task: int = 0
    """Source task copied by "from_task"."""
    prompt_tuning_init_text: str | None = None
    """Text whose token embeddings initialise P (with init "text")."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer for the init text: a local directory or hub id (or pass ``init_token_ids``)."""
    init_token_ids: tuple[int, ...] | None = None
    """Token ids for init "text", if you tokenised the text yourself."""

    def validate(self) -> None:
        for field in ("num_virtual_tokens", "num_tasks", "num_ranks"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{field} must be a positive int, got {value!r}")
        if self.prompt_tuning_init not in _INITS:
            raise ConfigError(f"prompt_tuning_init must be one of {_INITS}, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init in _FROM_SOURCE and not self.init_adapter_path:
            raise ConfigError(f"prompt_tuning_init={self.prompt_tuning_init!r} needs init_adapter_path: the directory "
                              f"of a saved source adapter")
        if self.prompt_tuning_init == "text" and not self.init_token_ids and not (
                self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError("prompt_tuning_init='text' needs prompt_tuning_init_text and tokenizer_name_or_path, "
                              "or init_token_ids")
        if not isinstance(self.init_task, int) or self.init_task < 0:
            raise ConfigError(f"init_task must be a non-negative int, got {self.init_task!r}")


class MultitaskPromptEmbedding(PromptEmbedding):
    """Shared prompt P (prompt tuning's table, ``embedding.weight``) and every task's U, V."""

    extra_inputs = ("task_ids",)

    def __init__(self, config: MultitaskPromptConfig, word_embeddings: nn.Embedding, blocks: int) -> None:
        super().__init__(config, word_embeddings, blocks)  # P, with the random / vocab / text init
        self.num_submodules = blocks  # seq2seq: the second block prompts the decoder
        self.num_tasks = config.num_tasks
        weight = self.embedding.weight
        kw = dict(device=weight.device, dtype=weight.dtype)
        K, N, r, d = config.num_tasks, weight.shape[0], config.num_ranks, weight.shape[1]
        self.prefix_task_cols = nn.Parameter(torch.randn(K, N, r, **kw) * _UV_STD)  # U
        self.prefix_task_rows = nn.Parameter(torch.randn(K, r, d, **kw) * _UV_STD)  # V
        if config.prompt_tuning_init in _FROM_SOURCE:
            self._init_from_source(config)

    def _init_from_source(self, config: MultitaskPromptConfig) -> None:
        path = config.init_adapter_path
        try:
            _, source = read_adapter(path)
        except AdapterLoadError as exc:
            raise AdapterLoadError(f"init_adapter_path: {exc} (it is read whenever this config creates an adapter, "
                                   f"from_pretrained included; the saved weights replace the init there)") from None
        values = {"prompt_embeddings": source.get("prompt_embeddings")}
        if config.prompt_tuning_init != "from_prompt":
            cols, rows = source.get("prefix_task_cols"), source.get("prefix_task_rows")
            if cols is None or rows is None:
                raise AdapterLoadError(f"prompt_tuning_init={config.prompt_tuning_init!r} needs a multitask adapter; "
                                       f"{path!r} has no prefix_task_cols/rows (keys: {sorted(source)}); for a "
                                       f"prompt-tuning adapter use 'from_prompt'")
            if config.prompt_tuning_init == "from_task":
                if config.init_task >= cols.shape[0]:
                    raise ConfigError(f"init_task={config.init_task} but {path!r} has {cols.shape[0]} tasks")
                cols, rows = cols[config.init_task], rows[config.init_task]
            else:
                cols, rows = cols.mean(0), rows.mean(0)
            # One source task (or the mean) starts every task here: (N, r) → (K, N, r), (r, d) → (K, r, d).
            values["prefix_task_cols"] = cols.unsqueeze(0).expand(self.num_tasks, -1, -1)
            values["prefix_task_rows"] = rows.unsqueeze(0).expand(self.num_tasks, -1, -1)
        own = self.adapter_state()
        for key, value in values.items():
            if value is None or tuple(value.shape) != tuple(own[key].shape):
                raise AdapterLoadError(
                    f"{key} of {path!r} has shape {None if value is None else tuple(value.shape)}, this adapter needs "
                    f"{tuple(own[key].shape)}; was the source trained with the same base model, num_virtual_tokens "
                    f"and num_ranks?"
                )
            with torch.no_grad():
                own[key].copy_(value.to(own[key].dtype))

    def prompt(self, batch_size: int, task_ids: torch.Tensor | None = None, **extra: torch.Tensor) -> torch.Tensor:
        task_ids = self._check_task_ids(task_ids, batch_size)
        modulation = self.prefix_task_cols[task_ids] @ self.prefix_task_rows[task_ids]  # (B, N, r) @ (B, r, d)
        return self.embedding.weight * modulation  # (N, d) ⊙ (B, N, d) → (B, N, d)

    def _check_task_ids(self, task_ids: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if not torch.is_tensor(task_ids):
            raise ValueError(f"multitask prompt tuning needs task_ids: an integer tensor of shape ({batch_size},), "
                             f"one task per row, e.g. task_ids=torch.tensor([0, 1, ...]); got {type(task_ids).__name__}")
        if task_ids.shape != (batch_size,) or task_ids.is_floating_point() or task_ids.dtype == torch.bool:
            got = f"{task_ids.dtype} of shape {tuple(task_ids.shape)}"
            raise ValueError(f"multitask prompt tuning needs task_ids: an integer tensor of shape ({batch_size},), "
                             f"one task per row, e.g. task_ids=torch.tensor([0, 1, ...]); got {got}")
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.num_tasks):
            bad = sorted({int(t) for t in task_ids if not 0 <= int(t) < self.num_tasks})
            raise ValueError(f"task_ids {bad} out of range: this adapter has num_tasks={self.num_tasks} "
                             f"(ids 0..{self.num_tasks - 1})")
        return task_ids.to(self.embedding.weight.device)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.weight, "prefix_task_cols": self.prefix_task_cols,
                "prefix_task_rows": self.prefix_task_rows}


def attach(model, name: str, config: MultitaskPromptConfig) -> None:
    base = model.base_model
    model.add_model_adapter(name, MultitaskPromptEmbedding(config, base.get_input_embeddings(), num_submodules(base)))


def _to_hf(config: MultitaskPromptConfig, model, name: str) -> dict[str, Any]:
    base = model.base_model
    # PEFT re-runs a source init when it loads the config (and re-reads the source), and its TEXT init
    # insists on a tokenizer; the weights come from the file anyway, so record "RANDOM" unless the text
    # init is fully described.
    text = config.prompt_tuning_init == "text" and config.tokenizer_name_or_path and config.prompt_tuning_init_text
    return {
        "peft_type": "MULTITASK_PROMPT_TUNING",
        "task_type": config.task_type,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": base.get_input_embeddings().weight.shape[1],
        "num_transformer_submodules": num_submodules(base),
        "num_tasks": config.num_tasks,
        "num_ranks": config.num_ranks,
        "prompt_tuning_init": "TEXT" if text else "RANDOM",
        "prompt_tuning_init_text": config.prompt_tuning_init_text if text else None,
        "tokenizer_name_or_path": config.tokenizer_name_or_path if text else None,
        "prompt_tuning_init_state_dict_path": None,
        "prompt_tuning_init_task": config.init_task,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "inference_mode": True,
    }


def _from_hf(d: dict[str, Any]) -> MultitaskPromptConfig:
    # Weights come from the file, so the init is not replayed (PEFT's source path may not exist here).
    return MultitaskPromptConfig(task_type=d.get("task_type"), num_virtual_tokens=d["num_virtual_tokens"],
                                 num_tasks=d.get("num_tasks", 1), num_ranks=d.get("num_ranks", 1),
                                 modules_to_save=d.get("modules_to_save"))


register("multitask", MultitaskPromptConfig, attach,
         hf=HFMapping("MULTITASK_PROMPT_TUNING", _to_hf, _from_hf, key_prefix=PROMPT_KEY_PREFIX))
