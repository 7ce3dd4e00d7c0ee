"""The command line: commands on tiny local models, config files, method options, one-line errors."""

import json

import pytest
import torch
import typer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from peftlab import (BottleneckConfig, ConfigError, LlamaAdapterConfig, LoraConfig, PromptTuningConfig,
                     get_peft_model)
from peftlab import generation
from peftlab.cli import OneLineErrors, app
from peftlab.cli_options import (METHOD_COMMAND, ConfigFile, build_method_config, method_config, method_options,
                                 parse_method_args)
from peftlab.export import load_adapted
from peftlab.generation import generate_texts
from peftlab.inspection import inspect_adapter
from tests.test_export import inputs, save_base

runner = CliRunner()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny local base model with a chat template, a LoRA adapter and a prompt-tuning adapter."""
    root = tmp_path_factory.mktemp("cli")
    base = save_base(root / "base")
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(root / "lora")
    prompt = PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), prompt).save_pretrained(root / "prompt")
    return {name: str(root / name) for name in ("base", "lora", "prompt")}


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    # Progress bars of model loading may come first; the error is one line, the last.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip("\n").endswith(errors[0]), result.stderr
    for fragment in fragments:
        assert fragment in errors[0]
    assert "Traceback" not in result.output


@pytest.fixture
def recorded(monkeypatch):
    """Replace generation with a recorder: what each call was asked, and canned replies."""
    calls = []

    def fake(model, tokenizer, items, **kwargs):
        calls.append({"inputs": [list(i) if isinstance(i, list) else i for i in items], **kwargs})
        return [f"reply {len(calls)}"] * len(items)

    monkeypatch.setattr(generation, "generate_texts", fake)
    return calls


# -- merge / inspect ---------------------------------------------------------------------------------

def test_merge_writes_shards_and_refuses_to_overwrite(dirs, tmp_path):
    out = tmp_path / "merged"
    result = run("merge", dirs["base"], dirs["lora"], str(out), "--max-shard-size", "20KB")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted, _ = load_adapted(dirs["base"], dirs["lora"])
    with torch.no_grad():
        assert (merged(**inputs()).logits - adapted.eval()(**inputs()).logits).abs().max() <= 1e-5

    assert_one_line_error(run("merge", dirs["base"], dirs["lora"], str(out)), "is not empty", "--overwrite")
    assert run("merge", dirs["base"], dirs["lora"], str(out), "--overwrite").exit_code == 0


def test_merge_of_a_prompt_adapter_says_to_serve_it_unmerged(dirs, tmp_path):
    assert_one_line_error(run("merge", dirs["base"], dirs["prompt"], str(tmp_path / "m")),
                          "prompt adapter", "serve it unmerged")


def test_inspect_table_and_json(dirs):
    model, _ = load_adapted(dirs["base"], dirs["lora"])
    expected = inspect_adapter(model, "default")

    table = run("inspect", dirs["base"], dirs["lora"])
    assert table.exit_code == 0, table.output
    assert table.stdout.strip() == expected.render()

    data = json.loads(run("inspect", dirs["base"], dirs["lora"], "--json").stdout)
    assert [row["norm"] for row in data["layers"]] == [row.norm for row in expected.layers]
    assert [row["numeric_rank"] for row in data["layers"]] == [2, 2, 2, 2]

    prompt = run("inspect", dirs["base"], dirs["prompt"])
    assert "prompt: no weight delta (virtual tokens); 64 parameters" in prompt.stdout  # 2 tokens × 32


# -- generate / chat -----------------------------------------------------------------------------------

def test_generate_batch_matches_the_library(dirs):
    result = run("generate", dirs["base"], "--adapter", dirs["lora"], "--prompt", "hello world",
                 "--prompt", "how are you", "--max-new-tokens", "3", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    model, tokenizer = load_adapted(dirs["base"], dirs["lora"])
    conversations = [[{"role": "user", "content": p}] for p in ("hello world", "how are you")]
    assert rows == [{"prompt": p, "completion": c} for p, c in
                    zip(["hello world", "how are you"], generate_texts(model, tokenizer, conversations, max_new_tokens=3))]


def test_generate_uses_the_chat_template_unless_told_not_to(dirs, recorded):
    assert run("generate", dirs["base"], "--prompt", "hello").exit_code == 0
    assert run("generate", dirs["base"], "--prompt", "hello", "--no-chat", "--temperature", "0.7").exit_code == 0
    assert recorded[0]["inputs"] == [[{"role": "user", "content": "hello"}]]
    assert recorded[1]["inputs"] == ["hello"] and recorded[1]["temperature"] == 0.7


def test_chat_keeps_the_history_until_exit(dirs, recorded):
    result = run("chat", dirs["base"], "--adapter", dirs["lora"], "--system", "be brief",
                 input="hello\nhow are you\n/reset\nfine\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["reply 1", "reply 2", "reply 3"]
    system = {"role": "system", "content": "be brief"}
    assert [call["inputs"][0] for call in recorded] == [
        [system, {"role": "user", "content": "hello"}],
        [system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "reply 1"},
         {"role": "user", "content": "how are you"}],
        [system, {"role": "user", "content": "fine"}],  # after /reset
    ]


def test_chat_runs_the_real_model_until_end_of_input(dirs):
    result = run("chat", dirs["base"], "--max-new-tokens", "2", input="hello\n")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) <= 1


# -- config files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, text", [
    (".yaml", "prompt: hello\nmax-new-tokens: 2\ntemperature: 0.5\n"),
    (".json", '{"prompt": ["hello"], "max_new_tokens": 2, "temperature": 0.5}'),
])
def test_config_file_values_are_defaults_and_flags_win(dirs, recorded, tmp_path, suffix, text):
    config = tmp_path / f"gen{suffix}"
    config.write_text(text)
    assert run("generate", dirs["base"], "--config", str(config)).exit_code == 0
    assert run("generate", dirs["base"], "--config", str(config), "--max-new-tokens", "5").exit_code == 0
    assert [(c["inputs"], c["max_new_tokens"], c["temperature"]) for c in recorded] == [
        ([[{"role": "user", "content": "hello"}]], 2, 0.5),
        ([[{"role": "user", "content": "hello"}]], 5, 0.5),
    ]


def test_config_file_can_hold_arguments(dirs, tmp_path):
    config = tmp_path / "inspect.yaml"
    config.write_text(f"base: {dirs['base']}\nadapter: {dirs['lora']}\njson: true\n")
    assert json.loads(run("inspect", "--config", str(config)).stdout)["method"] == "lora"


def test_config_file_errors(dirs, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("prompt: hi\nmax_tokens: 3\n")
    assert_one_line_error(run("generate", dirs["base"], "--config", str(config)),
                          "unknown key(s) max-tokens", "valid keys: adapter, base, chat, json, max-new-tokens")
    config.write_text("- a list\n")
    assert_one_line_error(run("generate", dirs["base"], "--config", str(config)), "must hold a mapping")
    config.write_text("prompt: [unclosed\n")
    assert_one_line_error(run("generate", dirs["base"], "--config", str(config)), "is not valid YAML")
    assert_one_line_error(run("generate", dirs["base"], "--config", str(tmp_path / "missing.yaml")), "missing.yaml")


# -- errors ---------------------------------------------------------------------------------------------

def test_user_errors_are_one_line_with_exit_code_2(dirs, tmp_path):
    assert_one_line_error(run("generate", str(tmp_path / "nowhere"), "--prompt", "hi"), "No model directory")
    assert_one_line_error(run("inspect", dirs["base"], str(tmp_path)), "has no adapter_config.json")
    assert_one_line_error(run("generate", dirs["base"], "--prompt", "hi", "--max-new-tokens", "abc"), "max-new-tokens")
    assert_one_line_error(run("generate", dirs["base"], "--prompt", "hi", "--max-new-tokens", "0"), "max-new-tokens")
    assert_one_line_error(run("generate", dirs["base"]), "--prompt")
    assert_one_line_error(run("merge", dirs["base"]), "Missing argument")
    assert_one_line_error(run("frobnicate"), "frobnicate")
    assert_one_line_error(run("merge", dirs["base"], dirs["lora"], str(tmp_path / "m"), "--dtype", "int8"),
                          "dtype must be one of float32, bfloat16, float16")


def test_peftlab_debug_shows_the_traceback_of_a_value_error(dirs, tmp_path, monkeypatch):
    """PEFTLAB_DEBUG=1: the ValueError/OSError that would be one line goes up with its traceback
    (an internal bug can raise them too); 0 or unset keeps the one line."""
    monkeypatch.setenv("PEFTLAB_DEBUG", "1")
    result = run("inspect", dirs["base"], str(tmp_path))
    assert result.exit_code != 0 and isinstance(result.exception, (ValueError, OSError))
    assert "has no adapter_config.json" in str(result.exception)
    monkeypatch.setenv("PEFTLAB_DEBUG", "0")
    assert_one_line_error(run("inspect", dirs["base"], str(tmp_path)), "has no adapter_config.json")


# -- method options --------------------------------------------------------------------------------------

def test_methods_command_lists_every_method_and_its_flags():
    listing = run("methods").stdout
    for name in ("lora", "loha", "ia3", "bottleneck (alias: adapter)", "prompt", "prefix", "ptuning",
                 "llama-adapter", "multitask"):
        assert f"\n{name}: " in "\n" + listing
    lora = run("methods", "lora").stdout
    assert lora.startswith("lora: LoRA: low-rank adaptation")
    assert "  --r INT  (default: 8)\n      Rank of the update B A." in lora
    assert "--target-modules TEXT|TEXT,...|none" in lora and "--task-type" not in lora
    assert run("methods", "adapter").stdout.startswith("bottleneck (alias: adapter): ")
    assert_one_line_error(run("methods", "nope"), "unknown method 'nope'", "llama-adapter")


def test_build_method_config_converts_text_to_field_types():
    config = build_method_config("lora", {"r": "16", "lora-alpha": "32", "--target-modules": "q_proj,v_proj",
                                          "use_rslora": "true", "layers_to_transform": "0,1",
                                          "init_lora_weights": "gaussian"}, task_type="CAUSAL_LM")
    assert config == LoraConfig(r=16, lora_alpha=32.0, target_modules=("q_proj", "v_proj"), use_rslora=True,
                                layers_to_transform=(0, 1), init_lora_weights="gaussian", task_type="CAUSAL_LM")
    assert build_method_config("lora", {"target_modules": "q_proj"}).target_modules == ("q_proj",)  # a name, not a regex
    assert build_method_config("lora", {"target_modules": "all-linear"}).target_modules == "all-linear"
    assert build_method_config("lora", {"target_modules": r".*\.(q|v)_proj"}).target_modules == r".*\.(q|v)_proj"
    assert build_method_config("lora", {"init_lora_weights": "false"}).init_lora_weights is False
    assert build_method_config("lora", {"r": 4, "target_modules": ["a", "b"]}).target_modules == ("a", "b")  # from YAML
    assert build_method_config("adapter", {"bottleneck": "4"}) == BottleneckConfig(bottleneck=4)
    assert build_method_config("llama-adapter", {"adapter_layers": "none", "gate-init": "-0.5"}) == \
        LlamaAdapterConfig(adapter_layers=None, gate_init=-0.5)


def test_every_default_survives_its_own_text_form():
    """Each option's default, written as on the command line, converts back to the default."""
    for method, options in method_options().items():
        for option in options:
            text = ("none" if option.default is None else ",".join(map(str, option.default))
                    if isinstance(option.default, tuple) else str(option.default))
            assert option.convert(text) == option.default, (method, option.field, text)


def test_method_option_errors_name_the_method_and_its_options():
    with pytest.raises(ConfigError) as err:
        build_method_config("lora", {"bottleneck": "4"})
    assert str(err.value).startswith("--bottleneck is not an option of lora; lora takes: --r, --lora-alpha, ")
    with pytest.raises(ConfigError, match=r"--lora-alph is not an option of lora \(did you mean --lora-alpha\?\)"):
        build_method_config("lora", {"lora_alph": "4"})
    with pytest.raises(ConfigError, match="--r takes INT, got 'abc'"):
        build_method_config("lora", {"r": "abc"})
    with pytest.raises(ConfigError, match="LoraConfig.r must be a positive int, got -1"):
        build_method_config("lora", {"r": "-1"})
    with pytest.raises(ConfigError, match="unknown method 'lorax'; choose one of adapter, bottleneck"):
        build_method_config("lorax", {})


def test_parse_method_args():
    assert parse_method_args(["--r", "16", "--use-rslora", "--lora-alpha=32", "--gate-init", "-0.5", "--x"]) == \
        {"r": "16", "use_rslora": "true", "lora_alpha": "32", "gate_init": "-0.5", "x": "true"}
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        parse_method_args(["stray"])


# A command shaped like the lead's `train`: --method plus method options from flags and the config file.
method_app = typer.Typer(cls=OneLineErrors, add_completion=False)


@method_app.callback()
def _group() -> None:
    """Test group."""


@method_app.command(context_settings=METHOD_COMMAND)
def fit(ctx: typer.Context, method: str = typer.Option("lora"), steps: int = typer.Option(1),
        config: ConfigFile = None) -> None:
    typer.echo(json.dumps({"steps": steps, **method_config(ctx, method, task_type="CAUSAL_LM").to_dict()}))


def test_method_command_flags_override_the_config_file(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("method: lora\nsteps: 3\nr: 4\nlora_alpha: 8\ntarget-modules: [q_proj, v_proj]\n")
    result = runner.invoke(method_app, ["fit", "--config", str(config), "--r", "16", "--use-rslora"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["method"], out["steps"], out["r"], out["lora_alpha"], out["use_rslora"]) == ("lora", 3, 16, 8, True)
    assert out["target_modules"] == ["q_proj", "v_proj"] and out["task_type"] == "CAUSAL_LM"

    other = runner.invoke(method_app, ["fit", "--config", str(config), "--method", "loha"])
    assert_one_line_error(other, "--lora-alpha is not an option of loha", "loha takes: --r, --alpha")
    assert_one_line_error(runner.invoke(method_app, ["fit", "--bottleneck", "4"]), "--bottleneck is not an option of lora")
    config.write_text("method: lora\nrank: 4\n")
    assert_one_line_error(runner.invoke(method_app, ["fit", "--config", str(config)]),
                          "unknown key(s) rank", "valid keys: method, steps; and the options of the chosen method")


def test_the_cli_runs_without_the_optional_extras_and_says_which_to_install(dirs, tmp_path):
    """Flower and the server's packages are extras: with them missing, ``peftlab`` still starts and
    its other commands run; a command that needs one fails in one line naming the extra."""
    import subprocess
    import sys

    script = """
import sys
for name in ("flwr", "ray", "fastapi", "uvicorn"):
    sys.modules[name] = None  # import of these now fails as if they were not installed
from typer.testing import CliRunner
from peftlab.cli import app
runner = CliRunner()
for args in (["inspect", sys.argv[1], sys.argv[2]], ["fed", "simulate", "--model", "x", "--data", sys.argv[3]],
             ["serve", "x"]):
    result = runner.invoke(app, args)
    print(result.exit_code, (result.stderr.strip().splitlines() or [""])[-1])
import peftlab.fed
print(all(hasattr(peftlab.fed, n) for n in peftlab.fed.__all__ if n not in ("FedResult", "prepare_data", "simulate")))
try:
    peftlab.fed.simulate
except ModuleNotFoundError as err:
    print("lazy:", err)
"""
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "hello", "label": "a"}) + "\n")
    out = subprocess.run([sys.executable, "-c", script, dirs["base"], dirs["lora"], str(data)], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0].startswith("0 "), out  # inspect needs no extra
    assert out[1] == "2 error: this command needs flwr, which is not installed: pip install 'peftlab[fed]'", out
    assert out[2] == "2 error: this command needs uvicorn, which is not installed: pip install 'peftlab[serve]'", out
    assert out[3] == "True" and out[4].startswith("lazy: peftlab.fed.simulate needs Flower") and "[fed]" in out[4]
