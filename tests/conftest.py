import pytest
import torch

from peftlab.models import tiny

torch.set_num_threads(2)

# Which task each tiny architecture is tested with, and the inputs its forward needs.
ARCH_TASKS = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "seq-cls", "t5": "seq2seq"}


def make_inputs(arch: str, batch: int = 3, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # one left-padded row, so masks are exercised
    out = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        out["decoder_input_ids"] = torch.randint(3, 100, (batch, 5), generator=g)
    return out


def output_of(result) -> torch.Tensor:
    return result.logits


@pytest.fixture
def tiny_model():
    def build(arch: str, seed: int = 0):
        return tiny(arch, ARCH_TASKS[arch], seed=seed).eval()

    return build
