import json

import pytest

from peftlab import AdapterConfig, ConfigError, LoraConfig, registered_methods


def test_json_roundtrip_and_method_field():
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2])
    data = json.loads(cfg.to_json())
    assert data["method"] == "lora" and data["target_modules"] == ["q_proj", "v_proj"]
    back = AdapterConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back, LoraConfig)
    assert back.target_modules == ("q_proj", "v_proj")  # lists stored as tuples: hashable, immutable


def test_frozen():
    cfg = LoraConfig()
    with pytest.raises(Exception):
        cfg.r = 3
    assert cfg.replace(r=3).r == 3 and cfg.r == 8


def test_unknown_field_and_method():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['rnk'\] for LoraConfig; valid fields: .*'r'"):
        AdapterConfig.from_dict({"method": "lora", "rnk": 4})
    with pytest.raises(TypeError, match="rnk"):
        LoraConfig(rnk=4)
    with pytest.raises(ConfigError, match="unknown method 'lorax'; registered methods: .*'lora'"):
        AdapterConfig.from_dict({"method": "lorax"})
    with pytest.raises(ConfigError, match="no 'method' field"):
        AdapterConfig.from_dict({"r": 4})


def test_registry_has_lora():
    assert registered_methods()["lora"].config_cls is LoraConfig
    assert registered_methods()["lora"].hf.peft_type == "LORA"


def test_scaling():
    assert LoraConfig(r=4, lora_alpha=8).scaling == 2.0
    assert LoraConfig(r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
