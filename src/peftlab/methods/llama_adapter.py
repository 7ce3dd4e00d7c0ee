"""LLaMA-Adapter: zero-init gated adaption prompts (Zhang et al. 2023, https://arxiv.org/abs/2303.16199).

Each of the top ``adapter_layers`` attention layers l learns K = ``adapter_len`` prompt vectors
P_l (K, hidden). They pass through the layer's own frozen key/value projections (no position
encoding: the prompt has no position) and every text query attends to them in a softmax of its
own, scaled by a learnable gate g_l that starts at zero:

    k_l, v_l = W_k P_l, W_v P_l                                   (kv_heads, K, head_dim) each
    a_l      = g_l · softmax(q k_lᵀ · scale) v_l                  (B, heads, Q, head_dim)
    out_l    = attention(q, k, v) + a_l                           before the output projection

so the start equals the base model exactly, and the prompt's influence grows only as g_l learns
(the paper's zero-init attention: the prompt's scores get a softmax of their own, times g_l,
next to the text's ordinary softmax). Scores are soft-maxed in fp32, as the base attention does.
``scale`` is the attention module's own (1/√head_dim for most models); kv heads are repeated for
grouped-query attention. Two gate forms:

* ``gate="scalar"`` (default): one g_l per layer, used as is — the paper's formula and Hugging
  Face PEFT's ``adaption_gate`` of shape (1,), so its files load and save 1:1;
* ``gate="tanh_per_head"``: one g per layer and head, applied as tanh(g) — what the authors'
  later LLaMA-Adapter V2 code does (bounded, heads open independently). Stored as (1, heads, 1, 1).
  An HF scalar g equals per-head gates atanh(g) in every head (|g| < 1); per-head tanh gates have
  no HF form in general, so these adapters save in peftlab's format only.

The prompt attention enters through peftlab's attention function (``AttentionAdapter.gated_output``),
so any architecture using transformers' attention interface works — llama-likes, GPT-2 (fused
``c_attn``), BERT, T5 (top layers of the decoder) — and generation with a KV cache, gradient
checkpointing and mixed-adapter batches need nothing special: the prompt is recomputed per call
and never enters the cache.

Tensors are keyed like Hugging Face PEFT's ``ADAPTION_PROMPT``: ``<attention path>.adaption_prompt``
(1, K, hidden) and ``<attention path>.adaption_gate``. HF's Llama path projects a_l with ``o_proj``
separately, which is the same as ours unless ``o_proj`` has a bias (then HF adds it twice, even at
g = 0; Llama/Mistral checkpoints have none). HF's GPT-2 variant computes something else, so its
files are refused in both directions rather than silently changing the model:

    HF GPT-2:  out_l = c_proj(attention(q, k, v)) + a_l           (a_l flattened to (B, Q, hidden))
    peftlab:   out_l = c_proj(attention(q, k, v) + a_l) = ... + a_l W_proj

The paper (zero-init attention: t = W_o(S_gᵀ V)) and its code project a_l, and so does HF's Llama path. No
conversion is exact: HF writes head h's prompt attention straight into hidden columns h·head_dim..,
while ours reaches them only through W_proj, which mixes heads, and one prompt must give both the
keys (hence each head's softmax) and the values through the frozen ``c_attn``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import AttentionAdapter, Site, self_attention_modules
from ..config import AdapterConfig, ConfigError, HFMapping, register
from ..targeting import describe, matches, unwrap

GATES = ("scalar", "tanh_per_head")

# Where an attention module keeps its key/value projections: separate (llama-likes, BERT, T5) or
# one fused q|k|v projection split in three (GPT-2). First match wins.
_SEPARATE_KV = (("k_proj", "v_proj"), ("key", "value"), ("k", "v"))
_FUSED_QKV = ("c_attn",)

# Model types whose HF PEFT ADAPTION_PROMPT computes what we compute (its TRANSFORMERS_MODEL_CONFIG
# minus gpt2, see the module docstring).
_HF_MODEL_TYPES = ("llama", "mistral")
_HF_GPT2_DIFFERS = ("Hugging Face PEFT's GPT-2 ADAPTION_PROMPT adds the gated prompt attention after c_proj, "
                    "unprojected, where the paper (and HF's own Llama path, and peftlab) project it with the "
                    "attention's output projection; since c_proj mixes heads, no choice of prompt and gate "
                    "converts one into the other exactly")


@dataclass(frozen=True)
class LlamaAdapterConfig(AdapterConfig):
    """Configuration of a LLaMA-Adapter (Hugging Face PEFT: ``AdaptionPromptConfig``)."""

    method = "llama_adapter"

    adapter_len: int = 10
    """K: prompt vectors per adapted layer (the paper uses 10)."""
    adapter_layers: int | None = None
    """How many layers, counted from the top of the stack, get prompts (the paper: 30 of LLaMA-7B's
    32); None = every layer. Encoder-decoder models: the decoder's layers."""
    target_modules: str | None = None
    """Name of the attention submodule to adapt (HF's field: "self_attn", "attn", ...); None = the
    self-attention modules the model routes through transformers' attention interface."""
    gate: str = "scalar"
    """"scalar": one gate per layer, g (paper, HF PEFT); "tanh_per_head": one per head, tanh(g)."""
    gate_init: float = 0.0
    """Initial value of every gate parameter. 0 (zero-init, the paper) makes a new adapter compute
    exactly the base model; other values are for tests and ablations."""

    def validate(self) -> None:
        if not isinstance(self.adapter_len, int) or isinstance(self.adapter_len, bool) or self.adapter_len <= 0:
            raise ConfigError(f"adapter_len must be a positive int, got {self.adapter_len!r}")
        if self.adapter_layers is not None and (not isinstance(self.adapter_layers, int) or isinstance(self.adapter_layers, bool)
                                                or self.adapter_layers <= 0):
            raise ConfigError(f"adapter_layers must be a positive int or None (every layer), got {self.adapter_layers!r}")
        if self.target_modules is not None and (not isinstance(self.target_modules, str) or not self.target_modules):
            raise ConfigError(f"target_modules must be one module name such as 'self_attn' (or None), "
                              f"got {self.target_modules!r}")
        if self.gate not in GATES:
            raise ConfigError(f"gate must be one of {GATES}, got {self.gate!r}")
        if not isinstance(self.gate_init, (int, float)) or not math.isfinite(self.gate_init):
            raise ConfigError(f"gate_init must be a finite number, got {self.gate_init!r}")


def projections(module: nn.Module) -> tuple[nn.Module, nn.Module | None] | None:
    """(key projection, value projection), or (fused q|k|v projection, None); None: not found.

    Other methods' wrappers are bypassed (``unwrap``): they route rows of the text batch, and the
    prompt is one row shared by all of them, so it always uses the frozen base projections.
    """
    for k_name, v_name in _SEPARATE_KV:
        k, v = getattr(module, k_name, None), getattr(module, v_name, None)
        if isinstance(k, nn.Module) and isinstance(v, nn.Module):
            return unwrap(k), unwrap(v)
    for name in _FUSED_QKV:
        if isinstance(getattr(module, name, None), nn.Module):
            return unwrap(getattr(module, name)), None
    return None


def prompt_kv(module: nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of ``prompt`` (1, K, hidden) from ``module``'s projections, each (K, kv_width)."""
    found = projections(module)
    if found is None:
        raise ConfigError(_no_projection_message(module))
    k_proj, v_proj = found
    if v_proj is None:
        _, k, v = k_proj(prompt)[0].chunk(3, dim=-1)
        return k, v
    return k_proj(prompt)[0], v_proj(prompt)[0]


def _no_projection_message(module: nn.Module) -> str:
    known = [f"{k}/{v}" for k, v in _SEPARATE_KV] + [f"{n} (fused q|k|v)" for n in _FUSED_QKV]
    return (f"LLaMA-Adapter cannot find the key/value projections of {type(module).__name__} (children: "
            f"{[n for n, _ in module.named_children()]}); known names: {known} — add this architecture's names "
            f"to _SEPARATE_KV or _FUSED_QKV in peftlab/methods/llama_adapter.py")


class AdaptionPrompts(AttentionAdapter):
    """The prompts and gates of one adapter, one pair per adapted layer of one stack."""

    def __init__(self, config: LlamaAdapterConfig, paths: dict[int, str], stack: str, hidden: int, heads: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.stack = stack  # "decoder" or "encoder": the stack whose layers ``paths`` index
        self.paths = paths  # layer index -> path of its attention module (the saved keys' prefix)
        self.tanh = config.gate == "tanh_per_head"
        gate_shape = (1, heads, 1, 1) if self.tanh else (1,)  # both broadcast over (B, heads, Q, K)
        kw = dict(device=device, dtype=dtype)
        # Standard normal prompts, as the authors' code (an nn.Embedding) and HF PEFT initialise them.
        self.adaption_prompt = nn.ParameterDict(
            {str(l): nn.Parameter(torch.empty(1, config.adapter_len, hidden, **kw).normal_()) for l in paths})
        self.adaption_gate = nn.ParameterDict(
            {str(l): nn.Parameter(torch.full(gate_shape, float(config.gate_init), **kw)) for l in paths})

    def gated_output(self, site: Site, module: nn.Module, query: torch.Tensor) -> torch.Tensor | None:
        """g · softmax(q kᵀ · scale) v for the rows in ``query`` (R, heads, Q, head_dim) -> (R, Q, heads, head_dim)."""
        key = str(site.layer)
        if site.stack != self.stack or key not in self.adaption_prompt:
            return None
        heads, head_dim = query.shape[1], query.shape[3]
        # Through the frozen projections in their dtype (an fp32 prompt on a bf16 base: cast down).
        k, v = prompt_kv(module, self.adaption_prompt[key].to(query.dtype))  # (K, kv_heads · head_dim) each
        K = k.shape[0]
        k = k.view(K, -1, head_dim).transpose(0, 1)  # (kv_heads, K, head_dim)
        v = v.view(K, -1, head_dim).transpose(0, 1)
        if heads % k.shape[0]:
            raise ValueError(f"{type(module).__name__} at layer {site.layer}: {heads} query heads are not a "
                             f"multiple of the prompt's {k.shape[0]} key/value heads")
        # GQA: kv head j serves query heads j·groups .. (j+1)·groups-1 (transformers' repeat_kv).
        groups = heads // k.shape[0]
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)  # (heads, K, head_dim)
        scale = getattr(module, "scaling", head_dim ** -0.5)
        scores = torch.matmul(query, k.transpose(1, 2).to(query.dtype)) * scale  # (R, heads, Q, K)
        # A softmax of the prompt's own, in fp32 (as the base attention upcasts), then the gate.
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        gate = self.adaption_gate[key]
        gate = (gate.tanh() if self.tanh else gate).to(query.dtype)
        out = torch.matmul(gate * probs, v.to(query.dtype))  # (R, heads, Q, head_dim)
        return out.transpose(1, 2)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        # Dotted keys: the core adds PEFT's "base_model.model." prefix and loads them in place.
        state = {}
        for layer, path in self.paths.items():
            state[f"{path}.adaption_prompt"] = self.adaption_prompt[str(layer)]
            state[f"{path}.adaption_gate"] = self.adaption_gate[str(layer)]
        return state


def adapted_modules(base: nn.Module, config: LlamaAdapterConfig) -> tuple[str, list[tuple[str, nn.Module]]]:
    """(stack, [(path, attention module)]) of the top ``adapter_layers`` layers, bottom first."""
    found = self_attention_modules(base)
    if not found:
        raise ConfigError(f"{type(base).__name__} has no self-attention module with a layer_idx; LLaMA-Adapter "
                          f"needs a model that calls attention through transformers' attention interface")
    # Decoder-only and seq2seq models: the decoder (where text is generated); encoders: the encoder.
    stack = "decoder" if any(s == "decoder" for _, _, s in found) else "encoder"
    sites = sorted(((p, m) for p, m, s in found if s == stack), key=lambda pm: pm[1].layer_idx)
    if config.target_modules is not None:
        named = [(p, m) for p, m in sites if matches(p, (config.target_modules,))]
        if not named:
            raise ConfigError(f"target_modules={config.target_modules!r} matched no self-attention module of "
                              f"{type(base).__name__}; its {stack} attention modules are {[p for p, _ in sites][:4]}...; "
                              f"pass their last name (e.g. {sites[0][0].rsplit('.', 1)[-1]!r}) or None")
        sites = named
    n = config.adapter_layers if config.adapter_layers is not None else len(sites)
    if n > len(sites):
        raise ConfigError(f"adapter_layers={n} but {type(base).__name__}'s {stack} has {len(sites)} attention "
                          f"layers; use at most {len(sites)} (or None for all)")
    chosen = sites[len(sites) - n:]
    for path, module in chosen:
        if projections(module) is None:
            raise ConfigError(f"{path}: " + _no_projection_message(module))
    return stack, chosen


def attach(model, name: str, config: LlamaAdapterConfig) -> None:
    base = model.base_model
    stack, chosen = adapted_modules(base, config)
    info = describe(base)
    weight = base.get_input_embeddings().weight
    paths = {module.layer_idx: path for path, module in chosen}
    model.add_model_adapter(name, AdaptionPrompts(config, paths, stack, info.hidden_size, info.num_heads,
                                                  weight.device, weight.dtype))


def _to_hf(config: LlamaAdapterConfig, model, name: str) -> dict[str, Any]:
    model_type = getattr(model.base_model.config, "model_type", None)
    if model_type == "gpt2":
        raise ConfigError(f"this GPT-2 LLaMA-Adapter has no Hugging Face PEFT form: {_HF_GPT2_DIFFERS}; "
                          f"save it with format='peftlab'")
    if model_type not in _HF_MODEL_TYPES:
        raise ConfigError(f"Hugging Face PEFT's ADAPTION_PROMPT exists only for model types {_HF_MODEL_TYPES} "
                          f"(and gpt2, computed differently), not {model_type!r}; save this adapter with "
                          f"format='peftlab'")
    if config.gate != "scalar":
        raise ConfigError(f"gate={config.gate!r} has no Hugging Face PEFT form (its adaption_gate is one "
                          f"untransformed scalar per layer); save with format='peftlab', or train with gate='scalar'")
    if config.effective_modules_to_save:
        raise ConfigError(f"Hugging Face PEFT's AdaptionPromptConfig has no modules_to_save (this adapter trains "
                          f"{list(config.effective_modules_to_save)}); save with format='peftlab'")
    paths = list(model.model_adapters[name].paths.values())
    return {
        "peft_type": "ADAPTION_PROMPT",
        "task_type": config.task_type,
        "adapter_len": config.adapter_len,
        "adapter_layers": len(paths),
        "target_modules": paths[0].rsplit(".", 1)[-1],  # HF wants the attention submodule's name
        "inference_mode": True,
    }


def _from_hf(d: dict[str, Any]) -> LlamaAdapterConfig:
    if d.get("target_modules") == "attn":  # HF's GPT-2 default; its Llama/Mistral paths use "self_attn"
        raise ConfigError(f"this ADAPTION_PROMPT adapter was made by Hugging Face PEFT for GPT-2 "
                          f"(target_modules='attn') and would compute something else here: {_HF_GPT2_DIFFERS}; "
                          f"use it with HF PEFT, or retrain it with peftlab's LlamaAdapterConfig")
    return LlamaAdapterConfig(task_type=d.get("task_type"), adapter_len=d["adapter_len"],
                              adapter_layers=d["adapter_layers"], target_modules=d.get("target_modules"))


register("llama_adapter", LlamaAdapterConfig, attach, hf=HFMapping("ADAPTION_PROMPT", _to_hf, _from_hf))
