"""The training loop: learning, schedules, accumulation, early stopping, non-finite losses, outputs."""

import json
import math

import pytest
import torch

from peftlab import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peftlab.models import tiny
from peftlab.train import NonFiniteLossError, TrainArgs, latest_checkpoint, train
from peftlab.train.checkpoint import load_checkpoint, trainable_tensors
from peftlab.train.loop import lr_factor
from peftlab.train.report import read_metrics

from .common import collate, counting_rows, lora_llama


def quiet(**kw):
    return TrainArgs(progress=False, **kw)


def test_lora_training_lowers_loss():
    losses = train(lora_llama(), counting_rows(64), args=quiet(steps=30, lr=1e-2), collate_fn=collate).losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.4 * first, f"loss did not fall clearly: {first:.3f} -> {last:.3f}"


def test_lr_schedules_closed_form():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0) and lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(4, 10, 0, "linear") == pytest.approx(0.6)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(3, 10, 0, "exp")


@pytest.mark.parametrize("schedule, expected", [("cosine", [0.5, 1.0, 1.0, 0.5]), ("linear", [0.5, 1.0, 1.0, 0.5]),
                                                ("constant", [0.5, 1.0, 1.0, 1.0])])
def test_loop_applies_the_schedule(schedule, expected):
    # warmup 2 of 4 steps: (s + 1) / 2 for s = 0, 1; then p = (s - 2) / 2 for s = 2, 3.
    seen = []
    train(lora_llama(), counting_rows(8), args=quiet(steps=4, batch_size=2, lr=0.1, warmup_steps=2, schedule=schedule),
          collate_fn=collate, on_log=lambda e: seen.append(e["lr"]))
    assert seen == pytest.approx([0.1 * f for f in expected])


def test_grad_accumulation_equals_the_bigger_batch():
    # Same 8 rows (the sampler's epoch permutation is shared), equal label counts per row: the mean of two
    # 4-row means is the 8-row mean, so the gradients and the AdamW step agree.
    rows = counting_rows(16)
    models = []
    for batch_size, accum in ((8, 1), (4, 2)):
        model = lora_llama()
        result = train(model, rows, args=quiet(steps=1, batch_size=batch_size, grad_accum=accum, lr=1e-2),
                       collate_fn=collate)
        models.append((model, result.losses[0]))
    (a, loss_a), (b, loss_b) = models
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    before = trainable_tensors(lora_llama())
    moved = 0
    for key, t in trainable_tensors(a).items():
        torch.testing.assert_close(t, trainable_tensors(b)[key], atol=1e-6, rtol=0)
        moved += not torch.equal(t, before[key])
    assert moved > 0, "the step changed nothing; the comparison would be vacuous"


def test_no_trainable_parameters_is_an_error():
    model = get_peft_model(tiny("llama", "causal-lm"), LoraConfig(target_modules=["q_proj"]))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, counting_rows(8), args=quiet(steps=1), collate_fn=collate)


def test_reduced_precision_on_cpu_is_refused():
    with pytest.raises(ValueError, match="autocast on cpu is not supported here; use precision='fp32'"):
        train(lora_llama(), counting_rows(8), args=quiet(steps=1, precision="bf16"), collate_fn=collate)


def test_early_stopping_after_patience(tmp_path):
    # Training moves probability onto tokens 3-52; the eval rows use tokens 60-109, so every eval is worse.
    eval_rows = [{"input_ids": [i + 57 for i in r["input_ids"]], "labels": [i + 57 for i in r["labels"]]}
                 for r in counting_rows(8, seed=1)]
    result = train(lora_llama(), counting_rows(32), eval_rows=eval_rows, collate_fn=collate,
                   args=quiet(steps=20, batch_size=4, lr=3e-2, eval_every=1, early_stopping_patience=2,
                              output_dir=str(tmp_path)))
    evals = [e["eval_loss"] for e in read_metrics(tmp_path / "metrics.jsonl") if e["event"] == "eval"]
    assert evals[1] > evals[0] and evals[2] > evals[0], f"premise: eval loss should rise, got {evals}"
    assert result.stopped_early and result.final_step == 3 and len(result.losses) == 3
    assert result.best_eval["step"] == 1 and result.best_eval["eval_loss"] == evals[0]
    assert latest_checkpoint(tmp_path).name == "step-000003"
    assert "stopped early at step 3" in (tmp_path / "README.md").read_text()


def test_early_stopping_needs_eval_rows():
    with pytest.raises(ValueError, match="early_stopping_patience=2 watches eval_loss; pass eval_rows"):
        train(lora_llama(), counting_rows(8), collate_fn=collate, args=quiet(steps=2, eval_every=1, early_stopping_patience=2))


def poison_after(model, calls):
    """From forward number ``calls + 1`` on, the head returns NaN logits (so the loss is NaN)."""
    count = [0]

    def hook(module, inputs, output):
        count[0] += 1
        return output * float("nan") if count[0] > calls else output

    model.base_model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("save_every", [0, 2])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, save_every):
    model = lora_llama()
    poison_after(model, calls=3)  # steps 1-3 are fine, step 4's loss is NaN
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4 .*rows \[.*Last good checkpoint: .*step-000003.*"
                                                 r"lower the learning rate") as info:
        train(model, counting_rows(16), collate_fn=collate,
              args=quiet(steps=6, batch_size=4, save_every=save_every, output_dir=str(tmp_path)))
    assert isinstance(info.value, FloatingPointError) and info.value.step == 4
    # With save_every=2 the last scheduled checkpoint is step 2, so step 3 is written on the way out;
    # with save_every=0 none was scheduled at all. Either way: the state after step 3, not the bad one.
    path = latest_checkpoint(tmp_path)
    assert path == info.value.checkpoint and path.name == "step-000003"
    fresh = lora_llama(seed=1)
    state = load_checkpoint(path, model=fresh, optimizer=torch.optim.AdamW(trainable_tensors(fresh).values()))
    assert state["step"] == 3 and len(state["result"]["losses"]) == 3
    for key, t in trainable_tensors(model).items():
        assert torch.isfinite(t).all()
        assert torch.equal(trainable_tensors(fresh)[key], t)
    PeftModel.from_pretrained(tiny("llama", "causal-lm", seed=0), path / "adapter")  # the adapter loads on its own


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]),
    PromptTuningConfig(num_virtual_tokens=3),
    PrefixTuningConfig(num_virtual_tokens=3),
], ids=["lora", "prompt", "prefix"])
def test_gradient_checkpointing_gives_the_same_losses(config):
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(tiny("llama", "causal-lm", seed=0), config)
        runs.append(train(model, counting_rows(8), collate_fn=collate,
                          args=quiet(steps=3, batch_size=4, lr=1e-2, gradient_checkpointing=checkpointing)).losses)
        assert model.base_model.is_activation_checkpointing == checkpointing
    assert runs[0] == pytest.approx(runs[1], abs=1e-6)
    assert runs[1][2] != runs[1][0], "the adapter did not train"


def test_outputs_adapter_metrics_plot_and_model_card(tmp_path):
    model = lora_llama()
    trainable, total = model.trainable_parameters()
    result = train(model, counting_rows(16), eval_rows=counting_rows(4, seed=1), collate_fn=collate,
                   data_summary="16 synthetic counting rows", command="peftlab train --steps 4",
                   generation_eval=lambda m: {"exact_match": 0.25},
                   args=quiet(steps=4, batch_size=4, eval_every=2, log_every=2, output_dir=str(tmp_path)))
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [("train", 2), ("eval", 2), ("train", 4), ("eval", 4)]
    assert events[0]["loss"] == pytest.approx(sum(result.losses[:2]) / 2)
    assert events[3]["exact_match"] == 0.25 and events[3]["perplexity"] == pytest.approx(math.exp(events[3]["eval_loss"]))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (tmp_path / "README.md").read_text()
    for text in (f"| trainable | {trainable:,d} |", f"| total | {total:,d} |", f"{100 * trainable / total:.4f} %",
                 "16 synthetic counting rows", "peftlab train --steps 4", '"r": 8', "| exact_match |",
                 "peft.PeftModel.from_pretrained"):
        assert text in card, text
    loaded = PeftModel.from_pretrained(tiny("llama", "causal-lm", seed=0), tmp_path / "adapter")
    for key, t in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[key], t)


def test_a_fresh_run_does_not_overwrite_checkpoints(tmp_path):
    train(lora_llama(), counting_rows(8), collate_fn=collate, args=quiet(steps=1, batch_size=4, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="already holds checkpoints .*step-000001.*pass resume=True"):
        train(lora_llama(), counting_rows(8), collate_fn=collate, args=quiet(steps=2, batch_size=4, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="batch_size 4 -> 2 since it was written"):
        train(lora_llama(), counting_rows(8), collate_fn=collate, resume=True,
              args=quiet(steps=2, batch_size=2, output_dir=str(tmp_path)))
