"""`peftlab train` and `peftlab eval` end to end on tiny local models: chat SFT and classification."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from peftlab.export import load_adapted
from tests.test_cli import assert_one_line_error, run
from tests.test_export import WORDS, save_base

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(save_base(tmp_path_factory.mktemp("train") / "base"))


def chat_rows(n=16):
    return [{"messages": [{"role": "user", "content": f"{WORDS[i % 6]} {WORDS[(i + 1) % 6]}"},
                          {"role": "assistant", "content": WORDS[(i + 2) % 6]}]} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_chat_jsonl_with_method_flags_then_eval(base, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    out = tmp_path / "run"
    result = run("train", "--model", base, "--data", data, "--output-dir", str(out), "--steps", "4",
                 "--batch-size", "4", "--lr", "1e-2", "--eval-fraction", "0.25", "--r", "4", "--lora-alpha", "8",
                 "--target-modules", "q_proj,v_proj", "--log-every", "1")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["method"], config["r"], config["lora_alpha"]) == ("lora", 4, 8)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss" in m] == [1, 2, 3, 4]
    assert (out / "loss.png").stat().st_size > 0 and "trainable" in (out / "README.md").read_text()

    # eval's loss is the token-weighted loss of the adapter on the rows, computed here by hand.
    result = run("eval", "--model", base, "--adapter", str(out / "adapter"), "--data", data, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    model, tokenizer = load_adapted(base, out / "adapter", default_task="causal-lm")
    from peftlab.data import collate, encode_records, read_records

    rows = encode_records(read_records(data), tokenizer).rows
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert metrics["rows"] == 16 and metrics["eval_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(torch.exp(loss).item(), rel=1e-5)


def test_config_file_holds_train_and_method_options_and_flags_win(base, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {base}\ndata: {data}\nsteps: 2\nbatch-size: 4\nmethod: ia3\n"
                   f"target_modules: [k_proj, v_proj]\nfeedforward_modules: []\n")
    out = tmp_path / "run"
    result = run("train", "--config", str(cfg), "--output-dir", str(out), "--steps", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["method"] == "ia3"
    losses = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(losses) == 1  # --steps 1 on the command line beat steps: 2 in the file


def test_train_classification_csv_and_eval_accuracy(base, tmp_path):
    labels = ["greeting", "question"]
    rows = [{"text": "hello world" if i % 2 == 0 else "how are you", "label": labels[i % 2]} for i in range(12)]
    data = tmp_path / "cls.csv"
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "run"
    result = run("train", "--model", base, "--data", str(data), "--output-dir", str(out), "--steps", "3",
                 "--batch-size", "4", "--r", "2", "--target-modules", "q_proj,v_proj")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter" / "labels.json").read_text()) == labels
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    # The head trains with the adapter (modules_to_save): its weights are in the file.
    assert any("score" in key for key in load_file(out / "adapter" / "adapter_model.safetensors"))

    result = run("eval", "--model", base, "--adapter", str(out / "adapter"), "--data", str(data), "--json")
    assert result.exit_code == 0, result.output
    accuracy = json.loads(result.stdout.strip().splitlines()[-1])["accuracy"]
    model, tokenizer = load_adapted(base, out / "adapter")
    assert isinstance(model.base_model, AutoModelForSequenceClassification._model_mapping[type(model.config)])
    hits = 0
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(row["text"], return_tensors="pt")
            hits += int(model(**ids).logits.argmax(-1).item() == labels.index(row["label"]))
    assert accuracy == pytest.approx(hits / len(rows))


def test_bad_row_is_one_line_naming_file_and_line(base, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(chat_rows(1)[0]) + "\n" + json.dumps({"messages": "hi"}) + "\n")
    result = run("train", "--model", base, "--data", str(data), "--output-dir", str(tmp_path / "o"), "--steps", "1")
    assert_one_line_error(result, "chat.jsonl:2", "--skip-bad-rows")


def test_option_of_another_method_is_refused(base, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    result = run("train", "--model", base, "--data", data, "--output-dir", str(tmp_path / "o"), "--steps", "1",
                 "--method", "lora", "--bottleneck", "8")
    assert_one_line_error(result, "--bottleneck is not an option of lora")


def test_train_args_are_validated_with_the_field_named(base, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    result = run("train", "--model", base, "--data", data, "--steps", "1", "--schedule", "exponential")
    assert_one_line_error(result, "schedule")


def test_save_every_uses_the_output_dir_flag(base, tmp_path):
    # TrainArgs refuses save_every without output_dir; the command's own --output-dir must reach it.
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    out = tmp_path / "run"
    result = run("train", "--model", base, "--data", data, "--output-dir", str(out), "--steps", "2",
                 "--batch-size", "4", "--save-every", "1", "--target-modules", "q_proj")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
