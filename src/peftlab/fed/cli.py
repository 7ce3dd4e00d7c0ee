"""``peftlab fed``: federated adapter training on Flower — ``simulate`` on one machine, ``server``
and ``client`` for a real deployment (a Flower SuperLink and one SuperNode per client).

The top-level ``peftlab`` app adds this group with ``app.add_typer(fed_app, name="fed")``; its
error handling (one line ``error: ...``, exit code 2) covers these commands too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from ..cli_options import METHOD_COMMAND, ConfigFile, canonical_method, method_config

fed_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                      help="Federated adapter training on Flower: clients train on private data, only adapters travel.")

_MODEL_HELP = "Base model: an alias (smollm2-135m-instruct, minilm-l6), a local model directory or a Hub id."
_PARTITION_HELP = ("How rows are split over clients: iid, dirichlet:ALPHA (label skew; 0.1 strong, 100 ~iid) or "
                   "by:FIELD (rows with the same FIELD value, e.g. a user id, stay on one client).")


def _strategy_options(strategy, aggregation, fraction, proximal_mu, server_lr, dp_noise, dp_clip):
    from .strategy import StrategyOptions

    return StrategyOptions(name=strategy, aggregation=aggregation, fraction=fraction, proximal_mu=proximal_mu,
                           server_lr=server_lr, dp_noise=dp_noise, dp_clip=dp_clip)


def _model_name(model: str) -> str:
    """A local model directory as an absolute path (Flower runs the apps in other directories)."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def _adapter_config(ctx: typer.Context, method: str, kind: str):
    """The method's config from the flags; LoRA/LoHa adapt every linear layer unless told otherwise."""
    adapter = method_config(ctx, method, task_type="SEQ_CLS" if kind == "classification" else "CAUSAL_LM")
    if adapter.method in ("lora", "loha") and adapter.target_modules is None:
        adapter = dataclasses.replace(adapter, target_modules="all-linear")
    return adapter


@fed_app.command(context_settings=METHOD_COMMAND)
def simulate(
    ctx: typer.Context,
    data: Path = typer.Option(..., exists=True, help="Training rows (.jsonl/.csv/...), split over the clients."),
    eval_data: Optional[Path] = typer.Option(None, exists=True,
                                             help="The server's evaluation rows (default: --eval-share of --data)."),
    model: str = typer.Option("smollm2-135m-instruct", help=_MODEL_HELP),
    method: str = typer.Option("lora", help="Adapter method (lora, loha, ia3, ...); its options follow as flags."),
    clients: int = typer.Option(8, min=1, help="Simulated clients."),
    rounds: int = typer.Option(10, min=1, help="Federated rounds."),
    partition: str = typer.Option("iid", help=_PARTITION_HELP),
    local_steps: int = typer.Option(10, min=1, help="Optimizer steps each client trains per round (E)."),
    batch_size: int = typer.Option(8, min=1, help="Rows per local step."),
    lr: float = typer.Option(1e-3, help="Clients' learning rate (AdamW)."),
    max_length: int = typer.Option(256, min=1, help="Longer rows are cut to this many tokens."),
    strategy: str = typer.Option("fedavg", help="Flower strategy: fedavg, fedprox or fedadam."),
    aggregation: str = typer.Option("fedavg", help="fedavg (per tensor), or for LoRA svd (exact mean ΔW, rank r) or "
                                                    "stack (exact, rank grows each round)."),
    fraction: float = typer.Option(1.0, help="Share of clients sampled each round."),
    proximal_mu: float = typer.Option(0.01, help="FedProx's μ (with --strategy fedprox)."),
    server_lr: float = typer.Option(0.01, help="FedAdam's server learning rate (with --strategy fedadam)."),
    dropout: float = typer.Option(0.0, help="Each client fails a round with this probability (failure drill)."),
    dp_noise: float = typer.Option(0.0, help="Central differential privacy: noise multiplier (0 = off)."),
    dp_clip: float = typer.Option(1.0, help="Central DP: L2 norm each client update is clipped to."),
    eval_share: float = typer.Option(0.1, help="Share of --data the server holds out (without --eval-data)."),
    seed: int = typer.Option(0, help="Seed of the split, the adapter init, client sampling and local batches."),
    out: Path = typer.Option(Path("out/fed"), help="Round checkpoints, history.jsonl, traffic.json, final adapter/."),
    resume: bool = typer.Option(False, help="Continue from the newest round checkpoint in --out."),
    backend: str = typer.Option("ray", help="ray (Flower's simulation engine) or in-process (no Ray; sequential)."),
    cpus_per_client: float = typer.Option(1.0, help="Ray CPUs per client: how many clients train at once."),
    gpus_per_client: float = typer.Option(0.0, help="Ray GPUs per client (e.g. 0.25: four clients share a GPU)."),
    verbose: bool = typer.Option(False, help="Show Flower's and Ray's own logs."),
    config: ConfigFile = None,
) -> None:
    """Simulate a federation on this machine: the data split over N clients, R rounds of Flower."""
    from ..formats import atomic_write
    from .partition import parse_partition
    from .rounds import latest_round
    from ..models import load_tokenizer
    from .settings import FedSettings
    from .simulate import BACKENDS, prepare_data, simulate as run
    from .task import check_aggregation

    if latest_round(out) is not None and not resume:
        raise ValueError(f"{out} already holds round checkpoints; pass --resume to continue that run, "
                         f"or choose another --out")
    spec = parse_partition(partition)
    options = _strategy_options(strategy, aggregation, fraction, proximal_mu, server_lr, dp_noise, dp_clip)
    check_aggregation(aggregation, canonical_method(method))
    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    tokenizer = load_tokenizer(model)
    fed_data = prepare_data(str(data), tokenizer, clients=clients, partition=spec, seed=seed,
                            eval_source=str(eval_data) if eval_data else None, eval_share=eval_share,
                            max_length=max_length)
    adapter = _adapter_config(ctx, method, fed_data.encoded.kind)
    settings = FedSettings(model=_model_name(model), adapter=adapter.to_dict(), kind=fed_data.encoded.kind,
                           label_names=fed_data.encoded.label_names, pad_id=tokenizer.pad_token_id,
                           max_length=max_length, local_steps=local_steps, batch_size=batch_size, lr=lr,
                           rounds=rounds, clients=clients, seed=seed, strategy=dataclasses.asdict(options),
                           out=str(out))
    typer.echo(f"data: {fed_data.encoded.summary()}; the server holds out {len(fed_data.eval_rows):,} rows")
    typer.echo(f"partition {spec} over {clients} clients:")
    for line in fed_data.lines[:16] + ([f"... ({clients - 16} more)"] if clients > 16 else []):
        typer.echo("  " + line)
    typer.echo(f"{adapter.method} adapter, {options.name} strategy, {options.aggregation} aggregation, "
               f"{options.sampled(clients)} of {clients} clients per round, {backend} backend")
    atomic_write(out / "settings.json", lambda p: p.write_text(settings.to_json() + "\n"))
    run(settings.task(), fed_data.partitions, settings.server_spec(resume=resume), eval_rows=fed_data.eval_rows,
        dropout=dropout, backend=backend, cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client,
        report=typer.echo, verbose=verbose)
    typer.echo(f"global adapter: {out / 'adapter'}; per-round metrics: {out / 'history.jsonl'}; "
               f"bytes: {out / 'traffic.json'}")


@fed_app.command(context_settings=METHOD_COMMAND)
def server(
    ctx: typer.Context,
    eval_data: Path = typer.Option(..., exists=True, help="The server's evaluation rows; they also fix the row kind "
                                                           "and the label names every client must use."),
    model: str = typer.Option("smollm2-135m-instruct", help=_MODEL_HELP),
    method: str = typer.Option("lora", help="Adapter method (lora, loha, ia3, ...); its options follow as flags."),
    clients: int = typer.Option(2, min=1, help="Clients (SuperNodes) in the federation; rounds wait for all of them."),
    rounds: int = typer.Option(10, min=1, help="Federated rounds."),
    local_steps: int = typer.Option(10, min=1, help="Optimizer steps each client trains per round (E)."),
    batch_size: int = typer.Option(8, min=1, help="Rows per local step."),
    lr: float = typer.Option(1e-3, help="Clients' learning rate (AdamW)."),
    max_length: int = typer.Option(256, min=1, help="Longer rows are cut to this many tokens."),
    strategy: str = typer.Option("fedavg", help="Flower strategy: fedavg, fedprox or fedadam."),
    aggregation: str = typer.Option("fedavg", help="fedavg, or for LoRA svd or stack."),
    fraction: float = typer.Option(1.0, help="Share of clients sampled each round."),
    proximal_mu: float = typer.Option(0.01, help="FedProx's μ."),
    server_lr: float = typer.Option(0.01, help="FedAdam's server learning rate."),
    dp_noise: float = typer.Option(0.0, help="Central differential privacy: noise multiplier (0 = off)."),
    dp_clip: float = typer.Option(1.0, help="Central DP: L2 norm each client update is clipped to."),
    seed: int = typer.Option(0, help="Seed of the adapter init, client sampling and local batches."),
    out: Path = typer.Option(Path("out/fed"), help="Round checkpoints, history.jsonl, traffic.json, final adapter/."),
    resume: bool = typer.Option(False, help="Continue from the newest round checkpoint in --out."),
    host: str = typer.Option("0.0.0.0", help="Address the SuperLink listens on."),
    port: int = typer.Option(8000, help="The SuperLink's port (clients and `flwr run` connect to it)."),
    start_superlink: bool = typer.Option(True, help="Start a SuperLink here; --no-start-superlink uses a running one."),
    dry_run: bool = typer.Option(False, help="Write the Flower App and print the commands, run nothing."),
    config: ConfigFile = None,
) -> None:
    """Serve a real federation: a Flower SuperLink, then the run; clients join with `peftlab fed client`."""
    import subprocess
    import time

    from ..data import encode_records, read_records
    from .deploy import flower_env, run_command, superlink_command, write_flower_app, write_flower_config
    from ..models import load_tokenizer
    from .settings import FedSettings
    from .task import check_aggregation

    options = _strategy_options(strategy, aggregation, fraction, proximal_mu, server_lr, dp_noise, dp_clip)
    check_aggregation(aggregation, canonical_method(method))
    tokenizer = load_tokenizer(model)
    encoded = encode_records(list(read_records(eval_data)), tokenizer, max_length=max_length)
    adapter = _adapter_config(ctx, method, encoded.kind)
    settings = FedSettings(model=_model_name(model), adapter=adapter.to_dict(), kind=encoded.kind,
                           label_names=encoded.label_names,
                           pad_id=tokenizer.pad_token_id, max_length=max_length, local_steps=local_steps,
                           batch_size=batch_size, lr=lr, rounds=rounds, clients=clients, seed=seed,
                           strategy=dataclasses.asdict(options), out=str(out.resolve()))
    app_dir = write_flower_app(out / "flower-app", settings, eval_data=str(eval_data), resume=resume)
    flwr_home = write_flower_config(out / "flwr-home", f"127.0.0.1:{port}")
    link, submit = superlink_command(host, port), run_command(app_dir)
    env = flower_env(flwr_home)
    typer.echo(f"Flower App: {app_dir / 'pyproject.toml'}; clients join with: peftlab fed client --superlink "
               f"<this host>:{port} --data <their file>")
    if dry_run:
        for command in ([link] if start_superlink else []) + [submit]:
            typer.echo(f"FLWR_HOME={env['FLWR_HOME']} " + " ".join(command))
        return
    superlink = subprocess.Popen(link, env=env) if start_superlink else None
    try:
        time.sleep(3 if superlink else 0)  # let the SuperLink open its ports
        code = subprocess.run(submit, env=env).returncode
    finally:
        if superlink is not None:
            superlink.terminate()
            superlink.wait()
    if code:
        raise typer.Exit(code)


@fed_app.command()
def client(
    superlink: str = typer.Option(..., help="The server's SuperLink address, host:8000."),
    data: Path = typer.Option(..., exists=True, dir_okay=False, help="This client's private training rows."),
    port: int = typer.Option(9094, help="Local port of the SuperNode's runtime API (one per SuperNode on a machine)."),
    dry_run: bool = typer.Option(False, help="Print the flower-supernode command, run nothing."),
    config: ConfigFile = None,
) -> None:
    """Join a federation as one client: a Flower SuperNode training on --data, which never leaves this machine."""
    import os

    from .deploy import supernode_command

    command = supernode_command(superlink, str(data), port=port)
    if dry_run:
        typer.echo(" ".join(command))
        return
    os.execvp(command[0], command)  # become the SuperNode: signals (Ctrl-C, kill) reach it directly
