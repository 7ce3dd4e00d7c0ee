"""P-tuning (Liu et al. 2021, https://arxiv.org/abs/2103.10385).

Like prompt tuning, n virtual tokens go in front of the input embeddings, but they are the output
of a small trainable *prompt encoder* rather than free parameters; the paper found this
reparametrisation trains more stably. From trainable inputs E (N, d), N = n · blocks:

    "mlp":   P = W₃ relu(W₂ relu(W₁ E + b₁) + b₂) + b₃            hidden width h
    "lstm":  H = BiLSTM(E) (N, 2h);   P = W₂ relu(W₁ H + b₁) + b₂   (W₁: 2h → 2h, W₂: 2h → d)

The module structure and parameter names are Hugging Face PEFT's ``PromptEncoder``
(``embedding``, ``mlp_head``, ``lstm_head``), so its weights copy over as they are. For
encoder-decoder models PEFT keeps blocks = 2 (2n inputs, all run through the encoder) but puts
only the first n outputs in front of the encoder input, as for prompt tuning; blocks = 1 otherwise.

Files hold both the encoder's weights (``prompt_encoder.<name>``: what training resumes from) and
its output P as ``prompt_embeddings`` — all that inference needs, and all PEFT saves. A file with
``prompt_embeddings`` alone (PEFT's) loads as a fixed table: ready for inference, but the encoder
that produced it is gone, so loading it with ``is_trainable=True`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import AdapterConfig, ConfigError, HFMapping, register
from ..formats import AdapterLoadError
from ..prompts import PROMPT_KEY_PREFIX, PromptAdapter
from .prompt import num_submodules

_ENCODERS = ("mlp", "lstm")
_ENCODER_KEY = "prompt_encoder."
"""File keys of the encoder's weights start with this; ``prompt_embeddings`` is the output."""
_HF_MLP_LAYERS = 2
"""Hugging Face PEFT's MLP always has two hidden layers (it ignores ``encoder_num_layers``)."""


@dataclass(frozen=True)
class PTuningConfig(AdapterConfig):
    """Configuration of a P-tuning adapter."""

    method = "ptuning"

    num_virtual_tokens: int = 20
    """Virtual tokens n prepended to the input (to the encoder's input for seq2seq models)."""
    encoder: str = "mlp"
    """Prompt encoder: "mlp" (the paper's recommendation) or "lstm" (bidirectional LSTM, then an MLP)."""
    encoder_hidden_size: int | None = None
    """Hidden width h of the encoder; default: the model's embedding width d."""
    encoder_num_layers: int = 2
    """"mlp": hidden layers (each Linear + ReLU) before the output layer; "lstm": stacked LSTM
    layers. Hugging Face PEFT's MLP is fixed at 2, so only 2 can be saved in its format."""
    encoder_dropout: float = 0.0
    """Dropout between stacked LSTM layers (unused by "mlp", as in Hugging Face PEFT)."""

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")
        if self.encoder not in _ENCODERS:
            raise ConfigError(f"encoder must be one of {_ENCODERS}, got {self.encoder!r}")
        if self.encoder_hidden_size is not None and (
                not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0):
            raise ConfigError(f"encoder_hidden_size must be a positive int or None (the embedding width), "
                              f"got {self.encoder_hidden_size!r}")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers <= 0:
            raise ConfigError(f"encoder_num_layers must be a positive int, got {self.encoder_num_layers!r}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


class PTuningEncoder(PromptAdapter):
    """One adapter's prompt encoder, or (loaded from a file without it) the fixed output table."""

    def __init__(self, config: PTuningConfig, dim: int, blocks: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.table: nn.Parameter | None = None  # set by prepare_load for an encoder-less file
        total, h = config.num_virtual_tokens * blocks, config.encoder_hidden_size or dim
        layers = config.encoder_num_layers
        kw = dict(device=device, dtype=dtype)
        self.embedding = nn.Embedding(total, dim, **kw)  # E: the encoder's trainable inputs, N(0, 1) like PEFT's
        if config.encoder == "lstm":
            # torch warns about dropout on a single layer (it only acts between layers); same module either way.
            self.lstm_head = nn.LSTM(dim, h, num_layers=layers, dropout=config.encoder_dropout if layers > 1 else 0.0,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, dim, **kw))
        else:
            self.lstm_head = None
            mlp: list[nn.Module] = []
            for i in range(layers):  # layers=2 is PEFT's Linear-ReLU-Linear-ReLU-Linear (mlp_head.0/.2/.4)
                mlp += [nn.Linear(dim if i == 0 else h, h, **kw), nn.ReLU()]
            self.mlp_head = nn.Sequential(*mlp, nn.Linear(h, dim, **kw))

    def output(self) -> torch.Tensor:
        """P, shape (n · blocks, d): the encoder's output, or the loaded table."""
        if self.table is not None:
            return self.table
        x = self.embedding.weight.unsqueeze(0)  # (1, N, d): the LSTM wants a batch
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]  # (1, N, 2h)
        return self.mlp_head(x)[0]  # (N, d)

    def prompt(self, batch_size: int, **extra: torch.Tensor) -> torch.Tensor:
        # The encoder runs once per forward; every row shares its output.
        return self.output()[: self.num_virtual_tokens].unsqueeze(0).expand(batch_size, -1, -1)  # (B, n, d)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        if self.table is not None:
            return {"prompt_embeddings": self.table}
        return {_ENCODER_KEY + k: p for k, p in self.named_parameters()}

    def state_to_save(self) -> dict[str, torch.Tensor]:
        if self.table is not None:
            return self.adapter_state()
        # The saved output must not depend on train/eval mode (LSTM dropout) nor carry a graph.
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self.output()
        finally:
            self.train(training)
        return {**self.adapter_state(), "prompt_embeddings": out}

    def prepare_load(self, keys: set[str], trainable: bool) -> None:
        if self.table is not None or "prompt_embeddings" not in keys or any(k.startswith(_ENCODER_KEY) for k in keys):
            return  # the encoder's own layout (or an incomplete file, which the loader reports)
        if trainable:
            raise AdapterLoadError(
                "this P-tuning file holds only the prompt encoder's output ('prompt_embeddings', as Hugging Face "
                "PEFT saves it), not the encoder, so its training cannot resume. Load it with is_trainable=False "
                "for inference; to fine-tune the virtual tokens directly, attach a PromptTuningConfig adapter with "
                "the same num_virtual_tokens and load_adapter_state_dict(name, {'prompt_embeddings': ...}) into it "
                "(same layout)"
            )
        weight = self.embedding.weight
        del self.embedding, self.mlp_head
        self.lstm_head = None
        self.table = nn.Parameter(torch.zeros_like(weight))  # filled by load_saved_state

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.table is not None:
            super().load_saved_state(state)
        # Next to the encoder, "prompt_embeddings" is derived (the loader has checked its shape): the
        # encoder weights, loaded with the other keys, recompute it, so there is nothing to copy.


def attach(model, name: str, config: PTuningConfig) -> None:
    base = model.base_model
    weight = base.get_input_embeddings().weight
    encoder = PTuningEncoder(config, weight.shape[1], num_submodules(base), weight.device, weight.dtype)
    model.add_model_adapter(name, encoder)


def _to_hf(config: PTuningConfig, model, name: str) -> dict[str, Any]:
    if config.encoder == "mlp" and config.encoder_num_layers != _HF_MLP_LAYERS:
        raise ConfigError(f"Hugging Face PEFT's P-tuning MLP has exactly {_HF_MLP_LAYERS} hidden layers; this "
                          f"adapter has encoder_num_layers={config.encoder_num_layers}: save it with format='peftlab'")
    base = model.base_model
    dim = base.get_input_embeddings().weight.shape[1]
    return {
        "peft_type": "P_TUNING",
        "task_type": config.task_type,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": dim,
        "num_transformer_submodules": num_submodules(base),
        "encoder_reparameterization_type": config.encoder.upper(),
        "encoder_hidden_size": config.encoder_hidden_size or dim,
        "encoder_num_layers": config.encoder_num_layers,
        "encoder_dropout": config.encoder_dropout,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "inference_mode": True,
    }


def _from_hf(d: dict[str, Any]) -> PTuningConfig:
    encoder = str(d.get("encoder_reparameterization_type", "MLP")).lower()
    return PTuningConfig(
        task_type=d.get("task_type"), num_virtual_tokens=d["num_virtual_tokens"], encoder=encoder,
        encoder_hidden_size=d.get("encoder_hidden_size"),
        # PEFT ignores encoder_num_layers for its MLP (always 2 hidden layers); its LSTM uses it.
        encoder_num_layers=_HF_MLP_LAYERS if encoder == "mlp" else d.get("encoder_num_layers", 2),
        encoder_dropout=d.get("encoder_dropout", 0.0), modules_to_save=d.get("modules_to_save"))


register("ptuning", PTuningConfig, attach, hf=HFMapping("P_TUNING", _to_hf, _from_hf, key_prefix=PROMPT_KEY_PREFIX))
