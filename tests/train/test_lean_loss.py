"""TrainArgs.lean_loss: the loop trains with the lean loss, and evaluation keeps its logits."""

import torch

from peftlab.train import TrainArgs, train

from .common import collate, counting_rows, lora_llama


def _masked_rows(n):
    """Counting rows whose first four tokens are an unscored prompt."""
    rows = counting_rows(n)
    for row in rows:
        row["labels"][:4] = [-100] * 4
    return rows


def test_lean_training_equals_standard_training():
    results, forwards = [], []
    for lean in (False, True):
        model = lora_llama()
        model.register_forward_hook(lambda m, args, out: forwards.append((m.lean_loss_enabled, out.logits is None)))
        args = TrainArgs(steps=4, batch_size=4, grad_accum=2, lr=1e-2, progress=False, lean_loss=lean)
        result = train(model, _masked_rows(16), args=args, collate_fn=collate, eval_rows=_masked_rows(4))
        adapter = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
        results.append((result, adapter))
        assert not model.lean_loss_enabled  # only inside the training forwards
    (standard, standard_adapter), (lean, lean_adapter) = results
    torch.testing.assert_close(lean.losses, standard.losses, rtol=1e-5, atol=1e-6)
    for key in standard_adapter:
        torch.testing.assert_close(lean_adapter[key], standard_adapter[key], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lean.last_eval["eval_loss"], standard.last_eval["eval_loss"], rtol=1e-5, atol=1e-6)
    # Training forwards of the lean run returned no logits; evaluation (which needs them) ran without it.
    assert (True, True) in forwards and (False, False) in forwards and (True, False) not in forwards


def test_lean_loss_is_on_by_default():
    assert TrainArgs().lean_loss is True
