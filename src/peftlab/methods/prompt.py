"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691).

``num_virtual_tokens`` trainable embeddings P (n, d) are prepended to every input's token
embeddings; the model itself is untouched. For encoder-decoder models the prompt goes in front
of the encoder input only; the stored table then has 2n rows, of which the first n are used —
Hugging Face PEFT's file layout, kept so adapter files move between the libraries.

Initialisation: ``random`` (N(0, 1) scaled like the vocabulary), ``vocab`` (embeddings of
randomly sampled vocabulary tokens) or ``text`` (embeddings of a given text's tokens, repeated or
truncated to n), the last being what the paper found best for small models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import AdapterConfig, ConfigError, HFMapping, register
from ..prompts import PROMPT_KEY_PREFIX, PromptAdapter

_INITS = ("random", "vocab", "text")


@dataclass(frozen=True)
class PromptTuningConfig(AdapterConfig):
    """Configuration of a prompt-tuning adapter."""

    method = "prompt"

    num_virtual_tokens: int = 20
    """Soft tokens prepended to the input (per stack: encoder and decoder for seq2seq)."""
    prompt_tuning_init: str = "random"
    """"random", "vocab" (sampled token embeddings) or "text" (embeddings of ``prompt_tuning_init_text``)."""
    prompt_tuning_init_text: str | None = None
    """Text whose token embeddings initialise the prompt (with init "text")."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer for the init text: a local directory or hub id (or pass ``init_token_ids``)."""
    init_token_ids: tuple[int, ...] | None = None
    """Token ids for init "text", if you tokenised the text yourself (no tokenizer needed)."""

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")
        if self.prompt_tuning_init not in _INITS:
            raise ConfigError(f"prompt_tuning_init must be one of {_INITS}, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "text" and not self.init_token_ids and not (
                self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError("prompt_tuning_init='text' needs prompt_tuning_init_text and tokenizer_name_or_path, "
                              "or init_token_ids")


class PromptEmbedding(PromptAdapter):
    """The trainable virtual tokens of one adapter: ``embedding.weight`` (n · submodules, d)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding, stored_blocks: int) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        total = config.num_virtual_tokens * stored_blocks
        weight = word_embeddings.weight
        self.embedding = nn.Embedding(total, weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if config.prompt_tuning_init == "vocab":
                ids = torch.randint(0, weight.shape[0], (total,), device=weight.device)
                self.embedding.weight.copy_(weight[ids])
            elif config.prompt_tuning_init == "text":
                ids = torch.tensor(_init_ids(config), device=weight.device)
                self.embedding.weight.copy_(weight[ids.repeat(total // len(ids) + 1)[:total]])

    def prompt(self, batch_size: int, **extra: torch.Tensor) -> torch.Tensor:
        return self.embedding.weight[: self.num_virtual_tokens].unsqueeze(0).expand(batch_size, -1, -1)  # (B, n, d)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.weight}


def _init_ids(config: PromptTuningConfig) -> list[int]:
    if config.init_token_ids:
        return list(config.init_token_ids)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    ids = tokenizer(config.prompt_tuning_init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenises to nothing")
    return ids


def num_submodules(model: nn.Module) -> int:
    """Prompt blocks Hugging Face PEFT stores: 2 for encoder-decoder models, else 1."""
    return 2 if getattr(model.config, "is_encoder_decoder", False) else 1


def attach(model, name: str, config: PromptTuningConfig) -> None:
    base = model.base_model
    model.add_model_adapter(name, PromptEmbedding(config, base.get_input_embeddings(), num_submodules(base)))


_INIT_TO_HF = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def _to_hf(config: PromptTuningConfig, model, name: str) -> dict[str, Any]:
    base = model.base_model
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": config.task_type,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": base.get_input_embeddings().weight.shape[1],
        "num_transformer_submodules": num_submodules(base),
        # PEFT rebuilds a TEXT init from the text and a tokenizer; with only token ids it would
        # refuse the file. The weights come from the file either way.
        "prompt_tuning_init": "RANDOM" if config.prompt_tuning_init == "text" and not config.tokenizer_name_or_path
        else _INIT_TO_HF[config.prompt_tuning_init],
        "prompt_tuning_init_text": config.prompt_tuning_init_text,
        "tokenizer_name_or_path": config.tokenizer_name_or_path,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "inference_mode": True,
    }


def _from_hf(d: dict[str, Any]) -> PromptTuningConfig:
    init = {v: k for k, v in _INIT_TO_HF.items()}.get(d.get("prompt_tuning_init", "RANDOM"))
    if init is None:
        raise ConfigError(f"prompt_tuning_init={d['prompt_tuning_init']!r} is not supported")
    # Weights come from the file, so the init only matters for the record; don't need a tokenizer.
    return PromptTuningConfig(task_type=d.get("task_type"), num_virtual_tokens=d["num_virtual_tokens"],
                              modules_to_save=d.get("modules_to_save"))


register("prompt", PromptTuningConfig, attach,
         hf=HFMapping("PROMPT_TUNING", _to_hf, _from_hf, key_prefix=PROMPT_KEY_PREFIX))
