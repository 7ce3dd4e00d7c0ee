"""The per-method entries of the invariant matrix (STYLE.md §9).

A new method adds one Case here; tests/methods/test_invariants.py runs every check over every
case × applicable tiny architecture.
"""

from dataclasses import dataclass
from typing import Callable

from peftlab import AdapterConfig, LoraConfig


@dataclass(frozen=True)
class Case:
    make: Callable[[str, int], AdapterConfig]
    """(arch, variant) -> config; variants 0 and 1 give two different adapters for mixed batches.
    Configs are built so the adapter changes the output (non-zero init) unless ``identity_init``."""
    archs: tuple[str, ...] = ("llama", "gpt2", "bert", "t5")
    mergeable: bool = False
    init_config: Callable[[str], AdapterConfig] | None = None
    """The method's default-initialised config, whose output must equal the base model's."""


def _lora(arch: str, variant: int) -> AdapterConfig:
    targets = "all-linear" if variant == 0 else None
    if variant == 1:
        targets = {"llama": ["q_proj", "v_proj", "embed_tokens"], "gpt2": ["c_attn", "wte"],
                   "bert": ["query", "value"], "t5": ["q", "v"]}[arch]
    return LoraConfig(r=4 + 2 * variant, lora_alpha=8, target_modules=targets, init_lora_weights=False)


CASES: dict[str, Case] = {
    "lora": Case(make=_lora, mergeable=True, init_config=lambda arch: LoraConfig(r=4, target_modules="all-linear")),
}
