"""Every method, the lean loss, a quantised base and the training loop on a GPU.

The oracle is the CPU: the same model and adapters, copied to the GPU, must give the same outputs
(fp32, TF32 off), the same gradients, the same greedy tokens and the same merged weights; mixed
batches and bf16 autocast training must work there too. These run where CUDA is present (the
device machine, when one is lent); elsewhere the module is skipped. ``PEFTLAB_TEST_DEVICE=cpu``
runs them against the CPU itself, which checks the tests' own logic on a machine without a GPU.
"""

import copy
import os

import pytest
import torch

from peftlab import BASE, LoraConfig, PeftModel, get_peft_model
from peftlab.models import tiny
from tests.conftest import make_inputs, output_of
from tests.methods.cases import CASES

DEVICE = os.environ.get("PEFTLAB_TEST_DEVICE", "cuda")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip("no CUDA device here (PEFTLAB_TEST_DEVICE=cpu checks these tests on the CPU)", allow_module_level=True)

torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls as on the CPU
torch.backends.cudnn.allow_tf32 = False
TOL = dict(atol=2e-5, rtol=2e-5)
ARCHS = {"llama": "causal-lm", "bert": "seq-cls"}
CASES_ON = [(m, a) for m in CASES for a in ARCHS if a in CASES[m].archs]


def on(inputs: dict, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def two_adapter_model(method: str, arch: str):
    case = CASES[method]
    model = get_peft_model(tiny(arch, ARCHS[arch], seed=0).eval(), case.make(arch, 0), adapter_name="a")
    model.add_adapter("b", case.make(arch, 1))
    return model


def inputs_for(method: str, arch: str) -> dict:
    inputs = make_inputs(arch)
    extra = CASES[method].extra_inputs
    return {**inputs, **(extra(inputs["input_ids"].shape[0]) if extra else {})}


@pytest.mark.parametrize("method,arch", CASES_ON, ids=[f"{m}-{a}" for m, a in CASES_ON])
def test_outputs_mixed_batches_and_gradients_equal_the_cpu(method, arch):
    cpu = two_adapter_model(method, arch)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    inputs = inputs_for(method, arch)
    for rows in (None, ["b", BASE, "a"]):
        kw = {} if rows is None else {"adapter_names": rows}
        with torch.no_grad():
            expected = output_of(cpu(**inputs, **kw), inputs)
            got = output_of(gpu(**on(inputs, DEVICE), **kw), inputs)
        assert got.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(got.cpu(), expected, **TOL)

    def grads(model, device):
        model.train()
        model.zero_grad()
        out = model(**on(inputs, device), adapter_names=["a", "b", "a"])
        output_of(out, inputs).float().pow(2).mean().backward()
        return {k: t.grad.cpu() for name in ("a", "b") for k, t in model.adapter_state_dict(name).items()
                if t.grad is not None}

    expected, got = grads(cpu, "cpu"), grads(gpu, DEVICE)
    assert got.keys() == expected.keys() and expected
    for k in expected:
        scale = max(1.0, expected[k].abs().max().item())
        torch.testing.assert_close(got[k], expected[k], atol=1e-4 * scale, rtol=1e-4)


GENERATORS = [m for m in CASES if "llama" in CASES[m].archs]


@pytest.mark.parametrize("method", GENERATORS)
def test_greedy_generation_with_a_cache_gives_the_cpus_tokens(method):
    cpu = two_adapter_model(method, "llama")
    gpu = copy.deepcopy(cpu).to(DEVICE)
    inputs = inputs_for(method, "llama")
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, adapter_names=["a", "b", BASE])
    expected = cpu.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs, **kw)
    got = gpu.generate(input_ids=ids.to(DEVICE), attention_mask=torch.ones_like(ids).to(DEVICE),
                       **on(inputs, DEVICE), **kw)
    assert torch.equal(got.cpu(), expected)


MERGEABLE = [m for m in CASES if CASES[m].mergeable]


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_and_unload_on_the_gpu_gives_the_cpus_weights(method):
    cpu = two_adapter_model(method, "llama")
    gpu = copy.deepcopy(cpu).to(DEVICE)
    cpu.set_adapter("a")
    gpu.set_adapter("a")
    expected = cpu.merge_and_unload().state_dict()
    got = gpu.merge_and_unload().state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k].cpu(), expected[k], atol=1e-5, rtol=1e-5)


def test_lean_loss_equals_the_models_loss_in_fp32_and_bf16():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        torch.manual_seed(0)
        model = get_peft_model(tiny("llama", "causal-lm", seed=0).to(DEVICE, dtype),
                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        ids = torch.randint(3, 100, (4, 33), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        labels = ids.clone()
        labels[:, :10] = -100

        def loss_and_grads(lean: bool):
            model.zero_grad()
            with model.lean_loss(enabled=lean, chunk_size=16):
                out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            return out.loss.float().item(), {k: t.grad.float().cpu() for k, t in model.adapter_state_dict().items()}

        plain, lean = loss_and_grads(False), loss_and_grads(True)
        assert lean[0] == pytest.approx(plain[0], rel=tol)
        for k in plain[1]:
            scale = plain[1][k].abs().max().item()
            torch.testing.assert_close(lean[1][k], plain[1][k], atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_peftlab_quantised_layers_on_the_gpu_equal_their_dequantised_weight(scheme):
    from peftlab.quant import QuantLinear, quantize_model

    cpu = quantize_model(tiny("llama", "causal-lm", seed=0), scheme, backend="torch")
    gpu = copy.deepcopy(cpu).to(DEVICE)
    for path, layer in gpu.named_modules():
        if isinstance(layer, QuantLinear):
            # The same codes and scales; the GPU's fused multiply-adds may round the last bit differently.
            torch.testing.assert_close(layer.weight.cpu(), cpu.get_submodule(path).weight, atol=1e-7, rtol=1e-6)
    ids = make_inputs("llama")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(gpu(input_ids=ids.to(DEVICE)).logits.cpu(), cpu(input_ids=ids).logits, **TOL)


def test_training_loop_bf16_autocast_learns_and_resumes_exactly(tmp_path):
    """``peftlab.train.train`` on the GPU: bf16 autocast lowers the loss; a run resumed from its
    step-4 checkpoint ends with the uninterrupted run's adapter (RNG state included)."""
    from peftlab.train import TrainArgs, train
    from tests.train.common import collate, counting_rows, lora_llama

    rows = counting_rows(64)
    precision = "bf16" if DEVICE.startswith("cuda") else "fp32"  # autocast is CUDA-only here

    def run(output_dir, steps, resume=False, seed=0):
        model = lora_llama(seed).to(DEVICE)
        args = TrainArgs(output_dir=str(output_dir), steps=steps, batch_size=8, lr=1e-2, save_every=4,
                         precision=precision, progress=False)  # a constant learning rate
        return model, train(model, rows, args=args, collate_fn=collate, resume=resume)

    full, result = run(tmp_path / "full", 24)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.6 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    run(tmp_path / "resumed", 4)
    # From the step-4 checkpoint; another initialisation, so everything must come from the checkpoint.
    resumed, _ = run(tmp_path / "resumed", 24, resume=True, seed=1)
    for k, t in full.adapter_state_dict().items():
        torch.testing.assert_close(resumed.adapter_state_dict()[k], t, atol=0, rtol=0)
    loaded = PeftModel.from_pretrained(tiny("llama", "causal-lm", seed=0).to(DEVICE), tmp_path / "full" / "adapter")
    ids = torch.randint(3, 50, (2, 8)).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, full.eval()(input_ids=ids).logits, atol=0, rtol=0)


def test_cli_train_quantize_nf4_trains_on_a_base_quantised_where_it_runs(tmp_path, monkeypatch):
    """``peftlab train --quantize nf4`` picks the device itself (CUDA when present): there the base is
    quantised as it moves to the GPU, so its layers are bitsandbytes' ``Linear4bit`` (when
    installed) on the GPU; on the CPU they are peftlab's NF4 layers. Either way LoRA trains on it
    and the saved adapter loads."""
    import json

    import peftlab.train
    from peftlab.quant import QuantLinear, bnb
    from tests.test_cli import run
    from tests.test_cli_train import chat_rows, write_jsonl
    from tests.test_export import save_base

    seen = {}
    real_train = peftlab.train.train

    def spy(model, *args, **kwargs):
        layer = model.get_submodule("base_model.model.layers.0.self_attn.q_proj").base_layer
        seen["layer"], seen["device"] = type(layer), layer.weight.device.type
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(peftlab.train, "train", spy)
    base = save_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(16))
    out = tmp_path / "run"
    result = run("train", "--model", str(base), "--data", data, "--output-dir", str(out), "--steps", "6",
                 "--batch-size", "4", "--lr", "1e-2", "--quantize", "nf4", "--log-every", "1")
    assert result.exit_code == 0, result.output
    cuda = torch.cuda.is_available()  # what the CLI picks, whatever PEFTLAB_TEST_DEVICE says
    assert seen["device"] == ("cuda" if cuda else "cpu")
    expected = bnb._layer_class() if cuda and bnb.available() else QuantLinear
    assert issubclass(seen["layer"], expected), seen["layer"]
    losses = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
