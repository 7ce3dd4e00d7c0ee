"""Per-request decoding settings and picking the next token from one row's logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes; the OpenAI request fields of the same names."""

    max_tokens: int = 16
    """Most tokens to generate (the stop token included)."""
    temperature: float = 1.0
    """0 = greedy (argmax); above 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: sample only among the most likely tokens whose probabilities sum to top_p."""
    stop: tuple[str, ...] = ()
    """Strings that end the completion; the text is cut before the first one."""
    seed: int | None = None
    """Seed of this request's own generator: the same seed and inputs give the same samples,
    whatever else is in the batch (up to floating-point differences of batched kernels)."""
    ignore_eos: bool = False
    """Keep going past end-of-text tokens until max_tokens or a stop string (for load tests)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from ``logits`` (V,) at ``params.temperature`` > 0, restricted to the top-p
    nucleus; ``generator`` (on the logits' device) is the request's own."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token while the mass before it is below top_p: the most likely token always stays.
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))
