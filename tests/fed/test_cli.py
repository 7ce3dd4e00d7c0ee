"""``peftlab fed simulate`` end to end on a tiny BERT saved with its own word tokenizer."""

import json
import random

import pytest
import typer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from peftlab.cli import OneLineErrors
from peftlab.fed.cli import fed_app
from peftlab.models import tiny

WORDS = ["alpha", "beta", "gamma"] + [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny BERT classifier and a word-level tokenizer, as a local model directory."""
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    tokenizer.save_pretrained(path)
    tiny("bert", "seq-cls", num_labels=3, vocab_size=len(vocab)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    g = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = []
    for _ in range(90):
        label = g.randrange(3)
        words = [f"w{g.randrange(40)}" for _ in range(5)] + [WORDS[label]]
        g.shuffle(words)
        lines.append(json.dumps({"text": " ".join(words), "label": WORDS[label]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _app():
    app = typer.Typer(cls=OneLineErrors)  # as the top-level `peftlab` app adds it
    app.add_typer(fed_app, name="fed")
    return app


def test_simulate_prints_rounds_accuracy_and_bytes(model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    args = ["fed", "simulate", "--data", str(data_file), "--model", str(model_dir), "--clients", "3", "--rounds", "2",
            "--partition", "dirichlet:1", "--local-steps", "2", "--batch-size", "4", "--lr", "0.01",
            "--backend", "in-process", "--out", str(out), "--method", "lora", "--r", "4",
            "--target-modules", "query,value"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "partition dirichlet:1 over 3 clients" in text and "client 2:" in text
    assert "round 2/2: 3/3 clients ok" in text and "accuracy" in text and "full-model FedAvg" in text
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2]
    traffic = json.loads((out / "traffic.json").read_text())
    assert traffic["total_down"] == sum(h["down"] for h in history[1:])
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "settings.json").is_file()
    again = CliRunner().invoke(_app(), args)  # the same --out again needs --resume
    assert again.exit_code == 2 and "pass --resume" in again.output
    resumed = CliRunner().invoke(_app(), [*args, "--resume"])
    assert resumed.exit_code == 0 and "all 2 rounds are done already" in resumed.output


@pytest.mark.parametrize("extra, message", [
    (["--partition", "shards"], "--partition 'shards' is not a partition"),
    (["--local-steps", "0"], "--local-steps must be at least 1, got 0"),
    (["--strategy", "fedsgd"], "strategy must be one of"),
    (["--aggregation", "svd", "--dp-noise", "1"], "use --aggregation fedavg with --dp-noise"),
    (["--method", "loha", "--aggregation", "svd"], "re-factorises LoRA's B·A, and the adapter is loha"),
    (["--strategy", "fedadam", "--aggregation", "stack"], "fedadam keeps Adam moments"),
])
def test_simulate_reports_mistakes_in_one_line(model_dir, data_file, tmp_path, extra, message):
    args = ["fed", "simulate", "--data", str(data_file), "--model", str(model_dir), "--backend", "in-process",
            "--clients", "2", "--rounds", "1", "--out", str(tmp_path / "x"), *extra]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output and result.output.count("\n") == 1


def test_server_and_client_dry_runs_write_a_valid_flower_app(model_dir, data_file, tmp_path):
    import tomllib

    from peftlab.fed.settings import FedSettings

    out = tmp_path / "fed"
    result = CliRunner().invoke(_app(), ["fed", "server", "--eval-data", str(data_file), "--model", str(model_dir),
                                         "--clients", "2", "--rounds", "3", "--out", str(out), "--dry-run",
                                         "--method", "lora", "--r", "4", "--target-modules", "query,value"])
    assert result.exit_code == 0, result.output
    # Safe default: the SuperLink listens on the loopback only, and the output says how to open it.
    assert "flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 --port 8000" in result.output
    assert "pass --host 0.0.0.0 to let SuperNodes on other machines connect" in result.output
    assert "flwr run" in result.output and f"FLWR_HOME={(out / 'flwr-home').resolve()}" in result.output
    app = tomllib.loads((out / "flower-app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "peftlab.fed.app:server_app", "clientapp": "peftlab.fed.app:client_app"}
    settings = FedSettings.from_json(app["config"]["settings"])
    assert (settings.rounds, settings.clients, settings.label_names) == (3, 2, ["alpha", "beta", "gamma"])
    assert settings.task().adapter.r == 4 and settings.model == str(model_dir.resolve())
    config = tomllib.loads((out / "flwr-home" / "config.toml").read_text())
    assert config["superlink"]["peftlab"] == {"address": "127.0.0.1:8000", "insecure": True}

    joined = CliRunner().invoke(_app(), ["fed", "client", "--superlink", "10.0.0.5:8000", "--data", str(data_file),
                                         "--dry-run"])
    assert joined.exit_code == 0
    assert joined.output.strip() == (f"flower-supernode --insecure --superlink 10.0.0.5:8000 --node-config "
                                     f"data=\"{data_file.resolve()}\" --port 9094")


@pytest.mark.parametrize("host, superlink_host, control", [
    ("0.0.0.0", "0.0.0.0", "127.0.0.1"),  # every interface: `flwr run` still goes through the loopback
    ("10.1.2.3", "10.1.2.3", "10.1.2.3"),  # one address: `flwr run` must use it, the loopback is not served
])
def test_server_listens_on_the_network_only_when_asked(model_dir, data_file, tmp_path, host, superlink_host, control):
    import tomllib

    out = tmp_path / "fed"
    result = CliRunner().invoke(_app(), ["fed", "server", "--eval-data", str(data_file), "--model", str(model_dir),
                                         "--out", str(out), "--dry-run", "--host", host, "--port", "8123",
                                         "--strategy", "fedprox", "--proximal-mu", "0.5"])
    assert result.exit_code == 0, result.output
    assert f"--host {superlink_host} --port 8123" in result.output and "pass --host 0.0.0.0" not in result.output
    config = tomllib.loads((out / "flwr-home" / "config.toml").read_text())
    assert config["superlink"]["peftlab"]["address"] == f"{control}:8123"
    # The shared run options reach the settings every participant reads.
    app = tomllib.loads((out / "flower-app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    settings = json.loads(app["config"]["settings"])
    assert settings["strategy"]["name"] == "fedprox" and settings["strategy"]["proximal_mu"] == 0.5


def test_simulate_and_server_share_one_definition_of_the_run_options():
    """Both commands' shared flags come from FedArgs and StrategyOptions, with the same help."""
    import click

    from peftlab.fed.settings import FedArgs

    commands = {name: typer.main.get_command(_app()).commands["fed"].commands[name] for name in ("simulate", "server")}
    shared = [f"--{f.replace('_', '-')}" for f in FedArgs.__dataclass_fields__] + [
        "--aggregation", "--fraction", "--proximal-mu", "--server-lr", "--dp-noise", "--dp-clip"]
    helps = {}
    for name, command in commands.items():
        options = {o.opts[0]: o for o in command.params if isinstance(o, click.Option)}
        assert set(shared) <= set(options), (name, set(shared) - set(options))
        helps[name] = {flag: options[flag].help for flag in shared}
        assert all(helps[name].values()), name  # every shared flag has help, from a docstring
    assert helps["simulate"] == helps["server"]
