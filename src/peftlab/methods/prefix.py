"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190) and P-tuning v2
(Liu et al. 2022, https://arxiv.org/abs/2110.07602).

Every self-attention layer l gets P trainable key/value vectors per kv head, attended to before
the text (which starts at position P). The table holds all of them:

    prefixes: (P, L · 2 · kv_heads · head_dim)      column = ((l·2 + {0: key, 1: value})·kv_heads + h)·head_dim + d

* ``prefix_projection=True`` (prefix tuning): during training the table is an MLP of a smaller
  embedding E (P, kv_dim): Linear(kv_dim → hidden) → tanh → Linear(hidden → L·2·kv_dim), which
  the paper found much more stable than optimising the table directly. Only the table is saved;
  the MLP is discarded, so a loaded adapter holds the table alone.
* ``prefix_projection=False`` (P-tuning v2, "deep prompts"): the table itself is trained; with
  ``task_type="SEQ_CLS"`` the classification head trains too (``modules_to_save``).

The keys and values enter through peftlab's attention function (``peftlab.attention``), so GQA
(kv_heads < heads), generation with a KV cache and gradient checkpointing all work.

Encoder-decoder models (T5) follow Hugging Face PEFT, whose adapters must load here and compute
the same: the table has L = ``config.num_layers`` slots and only the decoder's self-attention
reads it; the encoder and cross-attention get no prefix. PEFT's ``get_prompt`` stacks the table
twice and cuts it into per-layer (self key, self value, cross key, cross value) groups, then
empties the cross-attention cache, so decoder layer i reads slot 2i mod L (for even L, layers i
and i + L/2 share a slot and the odd slots are never read; they are kept, untrained, so files
keep PEFT's shape). T5 gives the prefix relative position biases as keys at 0..P-1 before text
starting at P, as PEFT's cache route does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..attention import AttentionAdapter, Site, self_attention_modules
from ..config import AdapterConfig, ConfigError, HFMapping, register
from ..prompts import PROMPT_KEY_PREFIX
from ..targeting import describe


@dataclass(frozen=True)
class PrefixTuningConfig(AdapterConfig):
    """Configuration of prefix tuning (or P-tuning v2 with ``prefix_projection=False``)."""

    method = "prefix"

    num_virtual_tokens: int = 20
    """Prefix length P: key/value vectors per layer and kv head."""
    prefix_projection: bool = True
    """Train the prefixes through an MLP (prefix tuning); False trains them directly (P-tuning v2)."""
    encoder_hidden_size: int | None = None
    """Hidden width of the reparametrisation MLP; default: the kv width (kv_heads · head_dim)."""

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size!r}")


class PrefixEncoder(AttentionAdapter):
    """The prefix table of one adapter, directly or through the MLP while training."""

    def __init__(self, config: PrefixTuningConfig, num_layers: int, slots: tuple[int, ...], kv_heads: int,
                 head_dim: int, stack: str, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.stack = stack  # the attention stack the prefixes belong to ("decoder" or "encoder")
        self.slots = slots  # layer l of the stack reads the table's slot slots[l] (see layout())
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        kv_dim = kv_heads * head_dim
        width = num_layers * 2 * kv_dim
        kw = dict(device=device, dtype=dtype)
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or kv_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, kv_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden, **kw), nn.Tanh(), nn.Linear(hidden, width, **kw))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width, **kw)
            self.transform = None

    def table(self) -> torch.Tensor:
        """(P, L · 2 · kv_dim): the prefixes of every layer."""
        weight = self.embedding.weight
        return self.transform(weight) if self.transform is not None else weight

    def prefix_kv(self, site: Site, module: nn.Module, batch_size: int):
        if site.stack != self.stack:
            return None
        P, kv_dim, slot = self.num_virtual_tokens, self.kv_heads * self.head_dim, self.slots[site.layer]
        layer = self.table()[:, slot * 2 * kv_dim:(slot + 1) * 2 * kv_dim]  # (P, 2 · kv_dim)
        kv = layer.view(P, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)  # (2, kv_heads, P, head_dim)
        return kv[0].expand(batch_size, -1, -1, -1), kv[1].expand(batch_size, -1, -1, -1)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.table().detach()}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        # The file holds the final table: drop the MLP and train (or serve) the table itself.
        table = state["prompt_embeddings"]
        expected = (self.num_virtual_tokens, self.num_layers * 2 * self.kv_heads * self.head_dim)
        if tuple(table.shape) != expected:
            raise ValueError(f"tensor prompt_embeddings: file has shape {tuple(table.shape)}, model expects {expected}")
        weight = self.embedding.weight
        self.transform = None
        self.embedding = nn.Embedding(*expected, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(table)


def layout(base: nn.Module) -> tuple[str, tuple[int, ...]]:
    """(the stack whose self-attention gets prefixes, the table slot each of its layers reads).

    Decoder-only and encoder-only models: every layer l reads slot l. Encoder-decoder models: the
    decoder, layer i reading slot 2i mod L, as in Hugging Face PEFT (module docstring).
    """
    info = describe(base)
    sites = self_attention_modules(base)
    if not sites:
        raise ConfigError(f"{type(base).__name__} has no self-attention modules with a layer_idx; prefix tuning "
                          f"needs a model that calls attention through transformers' attention interface")
    stack = "decoder" if info.is_encoder_decoder else sites[0][2]
    layers = sorted(m.layer_idx for _, m, s in sites if s == stack)
    if info.is_encoder_decoder:
        encoder = sum(s == "encoder" for _, _, s in sites)
        if layers != list(range(info.num_layers)) or encoder != info.num_layers:
            raise ConfigError(
                f"{type(base).__name__} has {encoder} encoder and {len(layers)} decoder self-attention layers; prefix "
                f"tuning on encoder-decoder models follows Hugging Face PEFT's layout, whose table has "
                f"num_layers={info.num_layers} slots read by the decoder, so it needs both stacks as deep as "
                f"num_layers; use LoRA, IA3 or prompt tuning for this model")
        return stack, tuple(2 * i % info.num_layers for i in range(info.num_layers))
    if layers != list(range(info.num_layers)):
        raise ConfigError(f"found {len(layers)} self-attention modules with a layer_idx in {type(base).__name__}, "
                          f"expected one per layer ({info.num_layers}); prefix tuning needs transformers' attention interface")
    return stack, tuple(range(info.num_layers))


def attach(model, name: str, config: PrefixTuningConfig) -> None:
    base = model.base_model
    info = describe(base)
    stack, slots = layout(base)
    weight = base.get_input_embeddings().weight
    model.add_model_adapter(name, PrefixEncoder(config, info.num_layers, slots, info.num_kv_heads, info.head_dim,
                                                stack, weight.device, weight.dtype))


def _to_hf(config: PrefixTuningConfig, model, name: str) -> dict[str, Any]:
    info = describe(model.base_model)
    kv_dim = info.num_kv_heads * info.head_dim
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": config.task_type,
        "num_virtual_tokens": config.num_virtual_tokens,
        "num_layers": info.num_layers,
        "token_dim": kv_dim,
        "num_attention_heads": info.num_kv_heads,
        "num_transformer_submodules": 2 if info.is_encoder_decoder else 1,  # 2: PEFT's seq2seq layout
        "prefix_projection": config.prefix_projection,
        "encoder_hidden_size": config.encoder_hidden_size or kv_dim,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "inference_mode": True,
    }


def _from_hf(d: dict[str, Any]) -> PrefixTuningConfig:
    return PrefixTuningConfig(task_type=d.get("task_type"), num_virtual_tokens=d["num_virtual_tokens"],
                              prefix_projection=d.get("prefix_projection", False),
                              encoder_hidden_size=d.get("encoder_hidden_size"), modules_to_save=d.get("modules_to_save"))


register("prefix", PrefixTuningConfig, attach,
         hf=HFMapping("PREFIX_TUNING", _to_hf, _from_hf, key_prefix=PROMPT_KEY_PREFIX))
