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


def output_of(result, inputs: dict) -> torch.Tensor:
    """Logits at the caller's own token positions.

    Prompt-type adapters prepend virtual tokens and, like Hugging Face PEFT, return logits for
    them too; the caller's tokens are always the last T positions (decoder positions for seq2seq).
    """
    logits = result.logits
    if logits.dim() != 3:
        return logits
    T = (inputs.get("decoder_input_ids") if "decoder_input_ids" in inputs else inputs["input_ids"]).shape[1]
    return logits[:, -T:]


@pytest.fixture
def tiny_model():
    def build(arch: str, seed: int = 0):
        return tiny(arch, ARCH_TASKS[arch], seed=seed).eval()

    return build
