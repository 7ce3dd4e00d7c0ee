"""The per-method entries of the invariant matrix (STYLE.md §9).

A new method adds one Case here; tests/methods/test_invariants.py runs every check over every
case × applicable tiny architecture.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from peftlab import AdapterConfig, BottleneckConfig, IA3Config, LoHaConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig
from peftlab import LlamaAdapterConfig, MultitaskPromptConfig, PTuningConfig


@dataclass(frozen=True)
class Case:
    make: Callable[[str, int], AdapterConfig]
    """(arch, variant) -> config; variants 0 and 1 give two different adapters for mixed batches.
    Configs are built so the adapter changes the output (non-zero init) unless ``identity_init``."""
    archs: tuple[str, ...] = ("llama", "gpt2", "bert", "t5")
    mergeable: bool = False
    init_config: Callable[[str], AdapterConfig] | None = None
    """The method's default-initialised config, whose output must equal the base model's."""
    extra_inputs: Callable[[int], dict] | None = None
    """batch size -> per-row forward inputs the method needs besides the text (e.g. ``task_ids``);
    test_invariants.py adds them to every forward of a model holding this method's adapters."""
    learn_config: Callable[[str], AdapterConfig] | None = None
    """Config for the learning test when the matrix configs are too small to learn (default: the
    identity-init config, else variant 0)."""
    learning_rate: float = 3e-2
    """For the learning test. Prompt tuning and (IA)³ train a few small vectors and want a larger
    rate (Lester et al. use 0.3)."""


def _lora(arch: str, variant: int) -> AdapterConfig:
    targets = "all-linear" if variant == 0 else None
    if variant == 1:
        targets = {"llama": ["q_proj", "v_proj", "embed_tokens"], "gpt2": ["c_attn", "wte"],
                   "bert": ["query", "value"], "t5": ["q", "v"]}[arch]
    return LoraConfig(r=4 + 2 * variant, lora_alpha=8, target_modules=targets, init_lora_weights=False)


def _dora(arch: str, variant: int) -> AdapterConfig:
    # LoRA's targets (embeddings included in variant 1). The magnitude starts at the norm, so f = 1
    # at init; tests/methods/test_lora.py checks merging and mixed rows with f ≠ 1.
    return _lora(arch, variant).replace(use_dora=True)


def _bottleneck(arch: str, variant: int) -> AdapterConfig:
    if variant == 0:
        return BottleneckConfig(variant="houlsby", bottleneck=8, init="random")
    # Another size, activation and placement, and per-adapter norm copies in mixed batches.
    return BottleneckConfig(variant="pfeiffer", reduction_factor=8, activation="gelu", scaling=0.5, init="random",
                            train_layernorms=True)


def _ia3(arch: str, variant: int) -> AdapterConfig:
    if variant == 0:
        return IA3Config(init_ia3_weights=False)  # the architecture's default targets
    # Other targets, and some layers scaled by input in one adapter and by output in the other.
    targets, ff = {"llama": (["q_proj", "v_proj", "down_proj"], ["v_proj"]),
                   "gpt2": (["c_attn", "c_fc", "mlp.c_proj"], ["c_attn"]),
                   "bert": (["query", "value", "dense"], ["value", "intermediate.dense"]),
                   "t5": (["q", "v", "wi", "wo"], ["v", "wi"])}[arch]
    return IA3Config(target_modules=targets, feedforward_modules=ff, init_ia3_weights=False)


def _loha(arch: str, variant: int) -> AdapterConfig:
    if variant == 0:
        return LoHaConfig(r=2, alpha=4, target_modules="all-linear", init_weights=False)
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"],
               "bert": ["query", "value", "intermediate.dense"], "t5": ["q", "v", "wi"]}[arch]
    # The other forward mode, so both are exercised alone and in mixed batches.
    return LoHaConfig(r=3, alpha=6, target_modules=targets, init_weights=False, forward_mode="materialize")


CASES: dict[str, Case] = {
    "bottleneck": Case(make=_bottleneck, init_config=lambda arch: BottleneckConfig(reduction_factor=4)),
    "ia3": Case(make=_ia3, mergeable=True, init_config=lambda arch: IA3Config(), learning_rate=0.3),
    "loha": Case(make=_loha, mergeable=True, init_config=lambda arch: LoHaConfig(r=2, target_modules="all-linear")),
    "lora": Case(make=_lora, mergeable=True, init_config=lambda arch: LoraConfig(r=4, target_modules="all-linear")),
    "dora": Case(make=_dora, mergeable=True,
                 init_config=lambda arch: LoraConfig(r=4, target_modules="all-linear", use_dora=True)),
    # Different lengths and both parametrisations (prefix tuning, P-tuning v2), so mixed batches
    # exercise unused prefix slots. On t5 the prefixes enter the decoder (tests/methods/test_prefix.py).
    "prefix": Case(make=lambda arch, v: PrefixTuningConfig(num_virtual_tokens=3 + v, prefix_projection=v == 0)),
    # Different lengths per variant, so mixed batches exercise the unused prompt slots.
    "prompt": Case(make=lambda arch, v: PromptTuningConfig(num_virtual_tokens=3 + v), learning_rate=0.3,
                   learn_config=lambda arch: PromptTuningConfig(num_virtual_tokens=20)),
    # Both encoders, different lengths; the MLP one with a hidden width other than d.
    "ptuning": Case(make=lambda arch, v: PTuningConfig(num_virtual_tokens=3 + v, encoder=("mlp", "lstm")[v],
                                                       encoder_hidden_size=(16, None)[v]),
                    # 3 virtual tokens level off near the learning test's bar (loss x 0.6 in 30 steps).
                    learn_config=lambda arch: PTuningConfig(num_virtual_tokens=8)),
    # Rows of one batch use different tasks; the variants differ in length, task count and rank.
    "multitask": Case(make=lambda arch, v: MultitaskPromptConfig(num_virtual_tokens=3 + v, num_tasks=2 + v,
                                                                 num_ranks=1 + v),
                      extra_inputs=lambda batch: {"task_ids": torch.arange(batch) % 2},
                      # 3 virtual tokens level off near the learning test's bar (loss x 0.6 in 30 steps).
                      learn_config=lambda arch: MultitaskPromptConfig(num_virtual_tokens=20, num_tasks=2)),
    # Non-zero gates so the adapter acts (zero-init is the identity, checked by init_config; a large
    # g because tiny BERT's classifier barely reacts); the variants differ in length, layer count
    # and gate form (scalar g vs tanh of per-head gates).
    "llama_adapter": Case(make=lambda arch, v: LlamaAdapterConfig(adapter_len=3 + v, adapter_layers=(None, 1)[v],
                                                                  gate=("scalar", "tanh_per_head")[v], gate_init=(8.0, 1.0)[v]),
                          init_config=lambda arch: LlamaAdapterConfig()),
}
