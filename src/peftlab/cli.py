"""The ``peftlab`` command line, generated from typed function signatures (typer).

Every command takes ``--config FILE`` (:data:`~peftlab.cli_options.ConfigFile`). User errors —
peftlab's own (``ConfigError``, ``AdapterLoadError``, ``DataError``, ...: all ``ValueError``s),
missing files, bad flags — print one line ``error: ...`` on stderr and exit with code 2, whatever
the command; see :class:`OneLineErrors`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import click
import typer
from typer.core import TyperGroup

from .cli_options import METHOD_COMMAND, ConfigFile, dataclass_options, describe_methods, method_config
from .fed.cli import fed_app
from .serve.cli import serve
from .train.args import TrainArgs


class OneLineErrors(TyperGroup):
    """Runs the command line and turns user errors into one line on stderr, exit code 2.

    Click shows usage errors as several lines (usage, hint, message) and typer as a box; a
    traceback is for bugs, not for a mistyped path or an invalid option value. A ``ValueError`` or
    ``OSError`` raised deep inside can still be a bug: ``PEFTLAB_DEBUG=1`` lets them through with
    their traceback.
    """

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            # `peftlab` alone prints the help through this exception (checked by name: older click lacks it).
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()
                sys.exit(exc.exit_code)
            _fail(exc.format_message(), getattr(exc, "exit_code", 2) or 2)
        except (ValueError, OSError) as exc:
            if os.environ.get("PEFTLAB_DEBUG", "") not in ("", "0"):
                raise
            _fail(str(exc) or type(exc).__name__, 2)
        except ModuleNotFoundError as exc:
            extra = _EXTRAS.get((exc.name or "").split(".")[0])
            if extra is None:  # not an optional dependency: a broken install or a bug
                raise
            _fail(f"this command needs {exc.name.split('.')[0]}, which is not installed: pip install 'peftlab[{extra}]'", 2)
        except typer.Abort:
            _fail("aborted", 1)
        sys.exit(code if isinstance(code, int) else 0)


# Optional dependencies (pyproject's extras) a command may import: module -> the extra that installs it.
_EXTRAS = {"flwr": "fed", "ray": "fed", "fastapi": "serve", "uvicorn": "serve"}


def _fail(message: str, code: int) -> None:
    typer.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(code)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Parameter-efficient fine-tuning of transformers models.")


@app.callback()
def main() -> None:
    """peftlab: train small adapters on frozen pretrained models."""


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Where the adapter and the loss curve go."),
    steps: int = typer.Option(0, help="Training steps (0 = the validated default)."),
    seed: int = typer.Option(0, help="Seed for the task split, the adapter init and the batches."),
    threads: int = typer.Option(2, help="CPU threads."),
    config: ConfigFile = None,
) -> None:
    """Teach SmolLM2-135M-Instruct an invented task with LoRA, offline, in a few minutes."""
    from .demo import run_demo

    if steps < 0:
        raise typer.BadParameter(f"--steps must be >= 0, got {steps}")
    if not run_demo(out, steps=steps or None, seed=seed, threads=threads):
        raise typer.Exit(code=1)


_BASE_HELP = "Base model: an alias (smollm2, minilm-l6), a local model directory or a Hugging Face Hub id."


@app.command()
def merge(
    base: str = typer.Argument(..., help=_BASE_HELP),
    adapter: Path = typer.Argument(..., help="Adapter directory (adapter_config.json + adapter_model.safetensors)."),
    out: Path = typer.Argument(..., help="Directory for the merged model (written atomically)."),
    max_shard_size: str = typer.Option("2GB", help="Largest safetensors shard, e.g. 500MB, 2GB."),
    dtype: str = typer.Option("float32", help="Saved weight dtype: float32, bfloat16 or float16 (merging runs in fp32)."),
    task: Optional[str] = typer.Option(None, help="causal-lm, seq-cls, seq2seq or base; default: the adapter's task_type."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists and is not empty."),
    config: ConfigFile = None,
) -> None:
    """Fold a LoRA/LoHa/IA3 adapter into the base weights: a plain transformers model directory."""
    from .export import merge_to_dir

    written = merge_to_dir(base, adapter, out, max_shard_size=max_shard_size, dtype=dtype, task=task,
                           overwrite=overwrite)
    shards = sorted(p.name for p in written.glob("*.safetensors"))
    typer.echo(f"merged {adapter} into {base}: {written} ({len(shards)} safetensors file(s) and the tokenizer)")


@app.command("inspect")
def inspect_(
    base: str = typer.Argument(..., help=_BASE_HELP),
    adapter: Path = typer.Argument(..., help="Adapter directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    config: ConfigFile = None,
) -> None:
    """Per-module ΔW norms and effective ranks, a merge check, and parameter counts of an adapter."""
    from .export import load_adapted
    from .inspection import inspect_adapter

    model, _ = load_adapted(base, adapter)
    report = inspect_adapter(model, "default")
    typer.echo(report.to_json() if as_json else report.render())


@app.command()
def generate(
    base: str = typer.Argument(..., help=_BASE_HELP),
    prompt: list[str] = typer.Option(..., "--prompt", help="Prompt text; repeat for a batch."),
    adapter: Optional[Path] = typer.Option(None, help="Adapter directory to apply (default: the plain base model)."),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate per prompt."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat",
                                        help="Wrap each prompt as a user turn of the chat template "
                                             "(default: when the tokenizer has one)."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; above 0 samples at this temperature."),
    seed: int = typer.Option(0, help="Seed for sampling."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line: prompt, completion."),
    config: ConfigFile = None,
) -> None:
    """Complete a batch of prompts with the base model, or with an adapter on it."""
    import torch

    from .export import load_adapted
    from .generation import generate_texts, has_chat_template

    model, tokenizer = load_adapted(base, adapter, default_task="causal-lm")
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    inputs = [[{"role": "user", "content": p}] for p in prompt] if use_chat else list(prompt)
    torch.manual_seed(seed)
    replies = generate_texts(model, tokenizer, inputs, max_new_tokens=max_new_tokens, temperature=temperature)
    for text, reply in zip(prompt, replies):
        if as_json:
            typer.echo(json.dumps({"prompt": text, "completion": reply}))
        elif len(prompt) == 1:
            typer.echo(reply)
        else:
            typer.echo(f"> {text}\n{reply}\n")


@app.command()
def chat(
    base: str = typer.Argument(..., help=_BASE_HELP),
    adapter: Optional[Path] = typer.Option(None, help="Adapter directory to apply (default: the plain base model)."),
    system: Optional[str] = typer.Option(None, help="System message at the start of the conversation."),
    max_new_tokens: int = typer.Option(256, min=1, help="Most tokens per reply."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; above 0 samples at this temperature."),
    seed: int = typer.Option(0, help="Seed for sampling."),
    config: ConfigFile = None,
) -> None:
    """Talk to the model: one line per turn on stdin, until end of input or /exit (/reset forgets)."""
    import torch

    from .export import load_adapted
    from .generation import generate_texts, has_chat_template

    model, tokenizer = load_adapted(base, adapter, default_task="causal-lm")
    if not has_chat_template(tokenizer):
        raise ValueError(f"{base}'s tokenizer has no chat template; use `peftlab generate --no-chat` for plain completion")
    torch.manual_seed(seed)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo("type a message; /reset starts over, /exit or Ctrl-D quits", err=True)
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line == "/reset":
            history = list(start)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = generate_texts(model, tokenizer, [history], max_new_tokens=max_new_tokens, temperature=temperature)[0]
        history.append({"role": "assistant", "content": reply})
        typer.echo(reply)


_DATA_HELP = ("Rows: a .jsonl/.json/.csv/.tsv/.parquet file, a directory written by datasets' save_to_disk, "
              "or a Hugging Face Hub dataset id. Each row is chat {messages}, {prompt, completion}, {text} or "
              "{text, label}.")


def _read_rows(source: str, split: str, dataset_config: str | None) -> list:
    from .data import read_records

    return list(read_records(source, split=split, config=dataset_config))


def _task_of_rows(records: list) -> str:
    """seq-cls for {text, label} rows, causal-lm for the others (the first well-formed row decides)."""
    from .data import detect_kind

    for _, row in records:
        if isinstance(row, dict):
            try:
                return "seq-cls" if detect_kind(row) == "classification" else "causal-lm"
            except ValueError:
                continue
    return "causal-lm"


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            out.append(token)
    return out


@app.command(context_settings=METHOD_COMMAND)
@dataclass_options(TrainArgs, into="args", exclude=("output_dir", "progress"))
def train(
    ctx: typer.Context,
    model: str = typer.Option(..., help=_BASE_HELP),
    data: str = typer.Option(..., help=_DATA_HELP),
    output_dir: Path = typer.Option(Path("out/train"), help="Adapter, checkpoints, metrics.jsonl, loss.png and "
                                                              "the model card README.md go here."),
    method: str = typer.Option("lora", help="lora, loha, ia3, adapter, prompt, ptuning, prefix, llama-adapter or "
                                             "multitask; its options are flags too (`peftlab methods M`)."),
    task: Optional[str] = typer.Option(None, help="causal-lm or seq-cls (default: seq-cls for {text, label} rows, "
                                                  "causal-lm otherwise)."),
    eval_data: Optional[str] = typer.Option(None, help="Rows to evaluate on (same formats as --data)."),
    eval_fraction: float = typer.Option(0.0, min=0.0, max=0.5, help="Without --eval-data: hold out this share of "
                                                                      "the training rows (a fixed, seeded choice)."),
    max_length: int = typer.Option(512, min=1, help="Truncate rows to this many tokens (the count is reported)."),
    packing: bool = typer.Option(False, help="Concatenate rows into blocks of exactly --max-length tokens."),
    skip_bad_rows: bool = typer.Option(False, help="Skip malformed rows (counted) instead of stopping at the first."),
    split: str = typer.Option("train", help="Split of a dataset with several."),
    dataset_config: Optional[str] = typer.Option(None, help="Configuration name of a Hub dataset."),
    quantize: Optional[str] = typer.Option(None, help="Store the frozen base in 4 bits (nf4) or 8 bits (int8)."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in --output-dir."),
    nproc: int = typer.Option(1, min=1, help="Processes for data-parallel training (torch.distributed; "
                                              "--batch-size is the global batch)."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads per process (default: torch's)."),
    args: TrainArgs = None,
    config: ConfigFile = None,
) -> None:
    """Train an adapter on your data: SFT on chat / prompt-completion / text rows, or classification."""
    import os
    import random
    import shlex

    import torch

    from . import get_peft_model
    from .data import collate, encode_records
    from .formats import atomic_write
    from .models import load, load_tokenizer
    from .quant import quantize_model
    from .train import train as run_training
    from .train import distributed

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(code=distributed.launch(nproc, _without_nproc(sys.argv[2:])))
    if threads:
        torch.set_num_threads(threads)
    device = distributed.init_from_env()  # CUDA when available (cuda:LOCAL_RANK under --nproc), else the CPU
    say = typer.echo if distributed.is_main() else (lambda *a, **k: None)
    records = _read_rows(data, split, dataset_config)
    task = task or _task_of_rows(records)
    if task not in ("causal-lm", "seq-cls"):
        raise ValueError(f"--task {task} is not trainable here; use causal-lm or seq-cls")
    # The method's flags are checked before anything slow (the tokenizer, the model) is loaded.
    adapter_config = method_config(ctx, method, task_type="SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM")
    tokenizer = load_tokenizer(model)
    encoded = encode_records(records, tokenizer, max_length=max_length, packing=packing, skip_bad_rows=skip_bad_rows)
    if (encoded.kind == "classification") != (task == "seq-cls"):
        raise ValueError(f"--task {task} does not fit {encoded.kind} rows; seq-cls trains on {{text, label}} rows, "
                         f"causal-lm on chat, prompt-completion and text rows")
    say(f"data: {encoded.summary()}", err=True)
    train_rows, eval_rows = encoded.rows, None
    if eval_data is not None:
        eval_encoded = encode_records(_read_rows(eval_data, split, dataset_config), tokenizer, max_length=max_length,
                                      skip_bad_rows=skip_bad_rows, label_names=encoded.label_names)
        eval_rows = eval_encoded.rows
        say(f"eval data: {eval_encoded.summary()}", err=True)
    elif eval_fraction > 0:
        order = list(range(len(train_rows)))
        random.Random(args.seed).shuffle(order)
        held = set(order[:max(1, round(eval_fraction * len(order)))])
        eval_rows = [r for i, r in enumerate(train_rows) if i in held]
        train_rows = [r for i, r in enumerate(train_rows) if i not in held]

    num_labels = len(encoded.label_names) if task == "seq-cls" else None
    # On a GPU the base is quantised layer by layer as it moves there, so NF4 gets bitsandbytes'
    # CUDA layers where installed; on the CPU it is quantised as it is read.
    on_gpu = device.type != "cpu"
    base, tokenizer = load(model, task=task, num_labels=num_labels, quantize=None if on_gpu else quantize)
    if on_gpu and quantize:
        quantize_model(base, quantize, device=device)
    if encoded.label_names:
        base.config.id2label = dict(enumerate(encoded.label_names))
        base.config.label2id = {name: i for i, name in enumerate(encoded.label_names)}
    torch.manual_seed(args.seed)  # the adapter's initialisation
    peft_model = get_peft_model(base, adapter_config).to(device)
    trainable, total = peft_model.trainable_parameters()
    say(f"{adapter_config.method}: {trainable:,d} trainable of {total:,d} parameters "
               f"({100 * trainable / total:.3f} %)", err=True)

    result = run_training(
        peft_model, train_rows, args=args,  # args.output_dir is --output-dir (dataclass_options)
        collate_fn=lambda rows: collate(rows, tokenizer.pad_token_id), eval_rows=eval_rows, resume=resume,
        tokenizer=tokenizer, data_summary=f"{data}: {encoded.summary()}",
        command=shlex.join(["peftlab", *sys.argv[1:]]),
    )
    if encoded.label_names and distributed.is_main():
        atomic_write(output_dir / "adapter" / "labels.json", lambda p: Path(p).write_text(json.dumps(encoded.label_names)))
    last = f"; last eval {json.dumps(result.last_eval)}" if result.last_eval else ""
    say(f"trained {result.final_step} steps in {result.seconds:.0f} s; loss {result.losses[0]:.4f} → "
                   f"{result.losses[-1]:.4f}{last}; adapter in {output_dir / 'adapter'}")


@app.command("eval")
def eval_(
    model: str = typer.Option(..., help=_BASE_HELP),
    data: str = typer.Option(..., help=_DATA_HELP),
    adapter: Optional[Path] = typer.Option(None, help="Adapter directory (default: the plain base model)."),
    task: Optional[str] = typer.Option(None, help="causal-lm or seq-cls (default: the adapter's, else from the rows)."),
    max_length: int = typer.Option(512, min=1, help="Truncate rows to this many tokens."),
    batch_size: int = typer.Option(8, min=1, help="Rows per forward."),
    split: str = typer.Option("train", help="Split of a dataset with several."),
    dataset_config: Optional[str] = typer.Option(None, help="Configuration name of a Hub dataset."),
    exact_match: bool = typer.Option(False, help="Also generate each row's answer greedily and report the share "
                                                 "that equals the reference (chat and prompt-completion rows)."),
    max_new_tokens: int = typer.Option(64, min=1, help="Most tokens per generated answer (--exact-match)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
    config: ConfigFile = None,
) -> None:
    """Loss and perplexity (language models) or accuracy (classifiers) of a model or adapter on rows."""
    from .data import collate, encode_records
    from .export import load_adapted
    from .generation import exact_match_rate
    from .train import evaluate

    records = _read_rows(data, split, dataset_config)
    labels_file = adapter / "labels.json" if adapter is not None else None
    label_names = json.loads(labels_file.read_text()) if labels_file is not None and labels_file.exists() else None
    peft_model, tokenizer = load_adapted(model, adapter, task=task,
                                         default_task=task or _task_of_rows(records))
    encoded = encode_records(records, tokenizer, max_length=max_length, label_names=label_names)
    metrics = evaluate(peft_model, encoded.rows, lambda rows: collate(rows, tokenizer.pad_token_id),
                       batch_size=batch_size)
    if exact_match:
        metrics["exact_match"] = exact_match_rate(peft_model, tokenizer, [row for _, row in records],
                                                  max_new_tokens=max_new_tokens, batch_size=batch_size)
    metrics = {"rows": len(encoded.rows), **metrics}
    typer.echo(json.dumps(metrics) if as_json else "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                               for k, v in metrics.items()))


app.command()(serve)
app.add_typer(fed_app, name="fed")


@app.command()
def methods(
    method: Optional[str] = typer.Argument(None, help="Show one method only (e.g. lora, adapter, llama-adapter)."),
    config: ConfigFile = None,
) -> None:
    """List the adapter methods and their options (the flags of `train --method M`)."""
    typer.echo(describe_methods(method))


if __name__ == "__main__":
    app()
