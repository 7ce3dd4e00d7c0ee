import numpy as np
import torch

from peftlab.fed.comms import TrafficLog, human, model_bytes, tensor_bytes


def test_tensor_bytes_counts_elements_times_width():
    state = {"a": torch.zeros(3, 4), "b": np.zeros(5, dtype=np.float32), "c": torch.zeros(2, dtype=torch.float16)}
    assert tensor_bytes(state) == 12 * 4 + 5 * 4 + 2 * 2


def test_model_bytes_counts_shared_weights_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    assert model_bytes(torch.nn.ModuleList([emb, head])) == 40 * 4


def test_traffic_log_totals_and_full_model_comparison():
    log = TrafficLog(full_model_bytes=1000)
    log.record(1, down=[10, 10, 10], up=[10, 10])  # one client failed: it sent nothing
    log.record(2, down=[10, 10, 10], up=[10, 10, 10])
    assert (log.total_down, log.total_up) == (60, 50)
    assert log.full_model_total == 11 * 1000
    assert TrafficLog.from_dict(log.to_dict()) == log
    assert "(100× more)" in log.summary()  # 11 × 1000 bytes / 110 bytes
    assert human(1536) == "1.5 KiB" and human(12) == "12 B"


def test_lora_r8_on_smollm2_sends_over_100x_less_than_the_full_model():
    """From the real SmolLM2-135M config, built on the meta device (no weights, no training)."""
    import os
    from pathlib import Path

    import pytest
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab import LoraConfig, get_peft_model

    cache = Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab"))
    config_dir = cache / "models" / "smollm2-135m-instruct"
    if not (config_dir / "config.json").is_file():
        pytest.skip("SmolLM2 is not converted yet (peftlab.models.load('smollm2-135m-instruct') does it once)")
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    full = model_bytes(base)
    # Embedding 49152·576 (tied head), per layer q, o 576² + k, v 576·192 + MLP 3·576·1536 + 2 norms, final norm.
    params = 49152 * 576 + 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576) + 576
    assert params == 134_515_008
    assert full == 4 * (params + sum(b.numel() for b in base.buffers()))  # + RoPE's frequency buffers
    adapter = tensor_bytes(get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).adapter_state_dict())
    # Per layer: q 8·(576 + 576) + v 8·(576 + 192) parameters; 30 layers; fp32.
    assert adapter == 4 * 30 * (8 * (576 + 576) + 8 * (576 + 192))
    log = TrafficLog(full)
    log.record(1, down=[adapter] * 8, up=[adapter] * 8)  # one round, 8 clients
    assert log.total_down + log.total_up == 2 * 8 * adapter
    assert log.full_model_total / (log.total_down + log.total_up) > 100  # 291.9x
