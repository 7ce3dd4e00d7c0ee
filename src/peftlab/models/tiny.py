"""Tiny randomly initialised models, built in code, for tests and examples.

Each architecture is shrunk to a hidden size of 32 and 2 layers so a forward and backward take
milliseconds, while keeping the structure adapters have to handle: Llama's grouped-query attention
(4 query heads sharing 2 key/value heads), GPT-2's ``Conv1D`` projections (weights stored
transposed), BERT's encoder and T5's encoder-decoder with relative attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
)

from .loaders import TASKS

#: Architecture -> the tasks :func:`tiny` can build it for.
TINY_ARCHS: dict[str, tuple[str, ...]] = {
    "llama": ("causal-lm", "seq-cls", "base"),
    "gpt2": ("causal-lm", "seq-cls", "base"),
    "bert": ("seq-cls", "base"),
    "t5": ("seq2seq", "seq-cls", "base"),
}

# Context length of the tiny models; plenty for tests and keeps position tables small.
_MAX_POSITIONS = 128

# Token ids the decoder-only configs reserve. Every tiny model pads with id 0 so batches can be
# padded and sequence classifiers (which look for the last non-pad token) work.
_PAD, _BOS, _EOS = 0, 1, 2


def _llama(vocab_size: int, num_labels: int) -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=_MAX_POSITIONS,
        attention_dropout=0.0,
        pad_token_id=_PAD,
        bos_token_id=_BOS,
        eos_token_id=_EOS,
        num_labels=num_labels,
    )


def _gpt2(vocab_size: int, num_labels: int) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=_MAX_POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        # GPT-2's defaults point at id 50256, outside a tiny vocabulary.
        pad_token_id=_PAD,
        bos_token_id=_BOS,
        eos_token_id=_EOS,
        num_labels=num_labels,
    )


def _bert(vocab_size: int, num_labels: int) -> PretrainedConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=_MAX_POSITIONS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )


def _t5(vocab_size: int, num_labels: int) -> PretrainedConfig:
    # T5's defaults already fit a tiny vocabulary (pad 0, eos 1). The decoder starts from the pad
    # token, as in the original checkpoints; T5Config has no default for it, and without one
    # training with `labels` fails.
    return T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        classifier_dropout=0.0,
        decoder_start_token_id=0,
        num_labels=num_labels,
    )


_CONFIGS: dict[str, Callable[[int, int], PretrainedConfig]] = {
    "llama": _llama,
    "gpt2": _gpt2,
    "bert": _bert,
    "t5": _t5,
}


def _valid_combos() -> str:
    return "; ".join(f"{arch}: {', '.join(tasks)}" for arch, tasks in TINY_ARCHS.items())


def tiny(
    arch: str,
    task: str = "causal-lm",
    *,
    num_labels: int = 2,
    seed: int = 0,
    vocab_size: int = 128,
) -> PreTrainedModel:
    """Build a tiny randomly initialised ``transformers`` model.

    Args:
        arch: ``"llama"``, ``"gpt2"``, ``"bert"`` or ``"t5"`` (see :data:`TINY_ARCHS`).
        task: ``"causal-lm"``, ``"seq-cls"``, ``"base"`` or ``"seq2seq"``; which ones an
            architecture supports is listed in :data:`TINY_ARCHS`.
        num_labels: classes of the ``"seq-cls"`` head.
        seed: the same seed gives bit-identical weights. The caller's global RNG state is left
            untouched.
        vocab_size: vocabulary size; ids 0-2 are special (pad 0 everywhere; bos 1 and eos 2 for
            llama/gpt2, eos 1 for t5).

    Returns:
        An fp32 model in training mode, as ``from_config`` leaves it. Every dropout probability is
        0 and attention is the eager implementation, so outputs are deterministic in either mode.
        Word-embedding tying follows each architecture's default.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(
            f"Unknown tiny arch {arch!r}; choose one of {', '.join(map(repr, TINY_ARCHS))} "
            f"(valid arch: tasks are {_valid_combos()})."
        )
    if task not in TINY_ARCHS[arch]:
        raise ValueError(
            f"tiny({arch!r}) cannot build task {task!r}; use one of "
            f"{', '.join(map(repr, TINY_ARCHS[arch]))} (valid arch: tasks are {_valid_combos()})."
        )
    if vocab_size < 3:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: ids 0-2 are special tokens; use 3 or more."
        )

    config = _CONFIGS[arch](vocab_size, num_labels)
    # Seed a private copy of the CPU RNG: the weights depend only on `seed`, and the caller's own
    # random stream continues as if tiny() had not been called.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TASKS[task].from_config(config, dtype=torch.float32, attn_implementation="eager")
