"""A PeftModel under transformers.Trainer and TRL's SFTTrainer (peftlab.train.hf_trainers).

A tiny Llama with LoRA on every linear layer trains for 3 steps; afterwards every base weight is
bit-identical, every LoRA B (zero at init) has moved, the loss is finite, and a checkpoint is an
adapter directory that PeftModel.from_pretrained and a resumed trainer read back exactly.
"""

import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.formats import CONFIG_NAME, WEIGHTS_NAME
from peftlab.train.hf_trainers import Trainer
from peftlab.models import tiny
from tests.helpers import chat_tokenizer

STEPS = 3
WORDS = "hello how are you fine thanks what is two plus three five the sky blue".split()


def _peft_model() -> PeftModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # LoRA A's initialisation: the same in every run
        return get_peft_model(tiny("llama", "causal-lm"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def _token_rows() -> Dataset:
    # 8 rows of 8 ids (0-2 are special); one length, so Trainer's default collator can stack them.
    return Dataset.from_list([{"input_ids": list(range(3 + i, 11 + i)), "labels": list(range(3 + i, 11 + i))}
                              for i in range(8)])


def _args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
                    report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    return TrainingArguments(**{**settings, **overrides})


class Snapshot:
    """Copies of the frozen base weights and of the LoRA B tensors, taken before training."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        adapter = model.adapter_state_dict()
        self.frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        self.lora_b = {k: t.detach().clone() for k, t in adapter.items() if ".lora_B." in k}
        # Trainable = exactly the adapter's declared tensors; the base is everything else.
        assert {id(p) for p in model.parameters() if p.requires_grad} == {id(t) for t in adapter.values()}
        assert len(self.frozen) == len(list(tiny("llama", "causal-lm").parameters()))
        assert self.lora_b and all(torch.equal(b, torch.zeros_like(b)) for b in self.lora_b.values())

    def check_only_adapter_moved(self) -> None:
        now = dict(self.model.named_parameters())
        assert all(torch.equal(now[n], before) for n, before in self.frozen.items())
        adapter = self.model.adapter_state_dict()
        assert all(not torch.equal(adapter[k], before) for k, before in self.lora_b.items())


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _finite_losses(trainer) -> list[float]:
    losses = _losses(trainer)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One Trainer run of STEPS steps that also checkpoints at the last step."""
    out = tmp_path_factory.mktemp("trainer")
    model = _peft_model()
    snapshot = Snapshot(model)
    trainer = Trainer(model=model, args=_args(out, save_strategy="steps", save_steps=STEPS), train_dataset=_token_rows())
    result = trainer.train()
    return trainer, snapshot, result, out / f"checkpoint-{STEPS}"


def test_trainer_trains_only_the_adapter(trained):
    trainer, snapshot, result, _ = trained
    snapshot.check_only_adapter_moved()
    _finite_losses(trainer)
    assert math.isfinite(result.training_loss) and trainer.state.global_step == STEPS


def test_trainer_checkpoint_is_an_adapter_directory(trained):
    trainer, _, _, checkpoint = trained
    assert (checkpoint / CONFIG_NAME).is_file() and (checkpoint / WEIGHTS_NAME).is_file()
    # Not the whole model: the adapter file holds the LoRA tensors only.
    assert not (checkpoint / "model.safetensors").exists()
    adapter = trainer.model.adapter_state_dict()
    assert (checkpoint / WEIGHTS_NAME).stat().st_size < 2 * sum(t.numel() * 4 for t in adapter.values())

    loaded = PeftModel.from_pretrained(tiny("llama", "causal-lm"), checkpoint)
    assert loaded.adapter_state_dict().keys() == adapter.keys()
    assert all(torch.equal(t, adapter[k]) for k, t in loaded.adapter_state_dict().items())


def test_trainer_resumes_from_its_checkpoint(trained, tmp_path):
    trainer, _, _, checkpoint = trained
    model = _peft_model()  # the same initialisation; its LoRA B is still zero
    seen, steps_run = {}, []

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # after the checkpoint is loaded
            seen.update({k: t.detach().clone() for k, t in model.adapter_state_dict().items()})

        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    resumed = Trainer(model=model, args=_args(tmp_path, max_steps=STEPS + 1), train_dataset=_token_rows(),
                      callbacks=[Watch()])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = trainer.model.adapter_state_dict()
    assert seen.keys() == expected.keys() and all(torch.equal(t, expected[k]) for k, t in seen.items())
    assert steps_run == [STEPS + 1]  # it went on from the checkpoint's step, not from the start


def test_trainer_gradient_checkpointing_keeps_the_route_and_the_result(trained, tmp_path):
    trainer, _, _, _ = trained
    model = _peft_model()
    # Count recomputations that go through the router's context (the route the forward saw).
    calls, context = [], model.router.checkpoint_context
    model.router.checkpoint_context = lambda: (calls.append(1), context())[1]
    snapshot = Snapshot(model)
    checkpointed = Trainer(model=model, args=_args(tmp_path, activation_checkpointing=True),
                           train_dataset=_token_rows())
    checkpointed.train()
    assert calls, "Trainer enabled checkpointing on the base model directly, bypassing PeftModel"
    snapshot.check_only_adapter_moved()
    # Recomputing activations changes where they come from, not their values: the same run, bit for bit.
    assert _finite_losses(checkpointed) == _finite_losses(trainer)
    expected = trainer.model.adapter_state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in model.adapter_state_dict().items())


def test_trainer_evaluates_the_loss(tmp_path):
    # LoRA B is zero at init, so the eval loss is the base model's loss on the same (single) batch.
    rows = _token_rows()
    loss = Trainer(model=_peft_model(), args=_args(tmp_path, per_device_eval_batch_size=len(rows)),
                   eval_dataset=rows).evaluate()["eval_loss"]
    ids = torch.tensor(rows["input_ids"])
    with torch.no_grad():
        expected = tiny("llama", "causal-lm")(input_ids=ids, labels=ids).loss.item()
    assert loss == pytest.approx(expected, rel=1e-6)


def test_sft_trainer_on_chat_rows(tmp_path):
    trl = pytest.importorskip("trl")
    from peftlab.train.hf_trainers import SFTTrainer

    tokenizer = chat_tokenizer(WORDS)
    rows = [
        [("user", "hello how are you"), ("assistant", "fine thanks")],
        [("user", "what is two plus three"), ("assistant", "five")],
        [("user", "what is the sky"), ("assistant", "the sky is blue")],
        [("user", "hello"), ("assistant", "hello how are you")],
    ]
    data = Dataset.from_list([{"messages": [{"role": r, "content": c} for r, c in turns]} for turns in rows * 2])
    model = _peft_model()
    snapshot = Snapshot(model)
    # Activation checkpointing is TRL's default (said here under its current name); fp32 on CPU.
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
                         report_to=[], use_cpu=True, bf16=False, activation_checkpointing=True, logging_steps=1,
                         disable_tqdm=True, save_strategy="steps", save_steps=STEPS)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert "forward" not in vars(model)  # TRL's fused LM head sits on the transformers model, under ours
    trainer.train()

    snapshot.check_only_adapter_moved()
    _finite_losses(trainer)
    # The metrics TRL computes from the fused head's extra outputs.
    assert all("entropy" in e and "mean_token_accuracy" in e for e in trainer.state.log_history if "loss" in e)
    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    loaded = PeftModel.from_pretrained(tiny("llama", "causal-lm"), checkpoint)
    assert all(torch.equal(t, model.adapter_state_dict()[k]) for k, t in loaded.adapter_state_dict().items())
    assert (checkpoint / "tokenizer_config.json").is_file()


def test_sft_trainer_refuses_an_adapter_on_the_lm_head(tmp_path):
    trl = pytest.importorskip("trl")
    from peftlab.train.hf_trainers import SFTTrainer

    model = get_peft_model(tiny("llama", "causal-lm"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    data = Dataset.from_list([{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "five"}]}])
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, bf16=False,
                         activation_checkpointing=False)
    with pytest.raises(ValueError, match="LM head's weight directly.*LoraLayer"):
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=chat_tokenizer(WORDS))


def test_trainers_refuse_other_models(tmp_path):
    with pytest.raises(TypeError, match="peftlab PeftModel.*LlamaForCausalLM"):
        Trainer(model=tiny("llama", "causal-lm"), args=_args(tmp_path), train_dataset=_token_rows())
