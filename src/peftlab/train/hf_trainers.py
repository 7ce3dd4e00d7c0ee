"""``transformers.Trainer`` and TRL's ``SFTTrainer`` for a peftlab :class:`~peftlab.PeftModel`.

Both trainers decide how to treat a model by its class: a ``PreTrainedModel`` or a Hugging Face
``peft.PeftModel`` is handled specially, anything else is a plain ``nn.Module``. Ours is neither
(peftlab wraps, it does not subclass), so the unmodified trainers

* refuse the dataset: they keep the columns ``model.forward`` names, and ours takes
  ``(*args, adapter_names=None, **kwargs)``, so no column is left (``remove_unused_columns=False``
  gets past that); they also find no ``labels`` argument, so evaluation reports no ``eval_loss``;
* checkpoint ``model.state_dict()`` into ``model.safetensors``: the whole base model rather than
  the adapter, which fails outright for tied embeddings (safetensors refuses shared tensors), and
  cannot resume from it;
* (TRL) replace ``model.forward`` by a fused LM head that calls ``model.base_model`` as the decoder
  backbone. On a ``transformers`` model that attribute is the decoder stack; on ours it is the whole
  causal LM, so the first step fails.

The subclasses below do for our model what the trainers do for ``peft.PeftModel``: read the
signature and labels of the ``transformers`` model inside, write checkpoints as adapter
directories (:meth:`~peftlab.PeftModel.save_pretrained`) and resume from them, and put TRL's fused
head on the ``transformers`` model, under our ``forward``, which still routes adapters and prepends
virtual tokens before it passes ``fused_lm_head=True`` down. They save from the main process only:
DeepSpeed and FSDP checkpoints are not supported.

``SFTTrainer`` needs ``trl``: it is defined on first access (``from peftlab.train.hf_trainers import
SFTTrainer``), so the rest of this module works without it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import transformers
from transformers.utils import can_return_loss, find_labels

from .. import formats
from ..layers import AdapterLayer
from ..model import DEFAULT, PeftModel

# What trl.SFTTrainer asks its fused head for: the loss, and the entropy and mean_token_accuracy
# metrics. Kept in step with TRL by tests/train/test_hf_trainers.py, which reads those metrics.
_SFT_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


class _AdapterTrainerMixin:
    """The parts of Hugging Face Trainer's PEFT support that apply to a peftlab PeftModel."""

    def __init__(self, model: PeftModel, *args: Any, **kwargs: Any) -> None:
        if not isinstance(model, PeftModel):
            raise TypeError(
                f"{type(self).__name__} trains a peftlab PeftModel (peftlab.get_peft_model(model, config)), "
                f"got {type(model).__name__}; pass other models to the trainer it extends"
            )
        super().__init__(model, *args, **kwargs)
        # Trainer reads these from the model's class, which for ours says nothing about the model inside.
        inner = type(model.base_model)
        if self.args.label_names is None:
            self.label_names = find_labels(inner)
        self.can_return_loss = can_return_loss(inner)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the adapters (``adapter_config.json`` + ``adapter_model.safetensors``) and the tokenizer.

        Unlike the base class, it does not push to the Hub by itself; ``push_to_hub()`` still does.
        """
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: PeftModel | None = None) -> None:
        """Load each adapter's tensors back from a checkpoint written by :meth:`save_model`."""
        model = model if model is not None else self.model
        for name in model.peft_config:
            # save_pretrained's layout: "default" in the directory itself, other adapters in subfolders.
            directory = Path(resume_from_checkpoint) if name == DEFAULT else Path(resume_from_checkpoint) / name
            _, tensors = formats.read_adapter(directory)
            model.load_adapter_state_dict(name, tensors)


class Trainer(_AdapterTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` for a peftlab PeftModel; takes the same arguments."""

    def _set_signature_columns_if_needed(self) -> None:
        # The columns the transformers model's forward accepts: ours passes them all through to it.
        if self._signature_columns is None:
            parameters = inspect.signature(self.model.base_model.forward).parameters
            self._signature_columns = [*parameters, "label", "label_ids", *self.label_names]


def _sft_trainer_class() -> type:
    import trl
    from trl.trainer.utils import add_fused_lm_head

    class SFTTrainer(_AdapterTrainerMixin, trl.SFTTrainer):
        """TRL's ``SFTTrainer`` for a peftlab PeftModel; takes the same arguments."""

        def __init__(self, model: PeftModel, *args: Any, **kwargs: Any) -> None:
            super().__init__(model, *args, **kwargs)
            head = model.base_model.get_output_embeddings()
            if isinstance(head, AdapterLayer):
                # TRL's own refusal for PEFT models: the fused head multiplies by head.weight directly.
                raise ValueError(
                    f"SFTTrainer computes log-probabilities from the LM head's weight directly, so the "
                    f"{type(head).__name__} on it would never train; leave the head out of target_modules "
                    f"and modules_to_save (\"all-linear\" already does)"
                )
            if "forward" in vars(self.model):  # TRL patched our wrapper as if it were the transformers model
                del self.model.forward
                add_fused_lm_head(self.model.base_model, outputs=_SFT_FUSED_OUTPUTS)

    return SFTTrainer


def __getattr__(name: str) -> Any:
    # Module attribute hook (PEP 562): TRL is imported only when its trainer is asked for.
    if name == "SFTTrainer":
        globals()[name] = _sft_trainer_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
