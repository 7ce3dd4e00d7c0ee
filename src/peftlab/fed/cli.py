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

from ..cli_options import METHOD_COMMAND, ConfigFile, canonical_method, dataclass_options, method_config
from .settings import FedArgs
from .spec import StrategyOptions

fed_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                      help="Federated adapter training on Flower: clients train on private data, only adapters travel.")

_PARTITION_HELP = ("How rows are split over clients: iid, dirichlet:ALPHA (label skew; 0.1 strong, 100 ~iid) or "
                   "by:FIELD (rows with the same FIELD value, e.g. a user id, stay on one client).")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_ANY_ADDRESS = ("0.0.0.0", "::")


def _run_options(command):
    """The flags ``simulate`` and ``server`` share, generated from :class:`FedArgs` (handed to the
    command as ``args``) and from :class:`StrategyOptions` (as ``options``; its ``name`` is ``--strategy``)."""
    command = dataclass_options(FedArgs, into="args")(command)
    return dataclass_options(StrategyOptions, into="options", exclude=("name",))(command)


def _strategy(args: FedArgs, options: StrategyOptions) -> StrategyOptions:
    """The strategy options with ``--strategy`` filled in, checked against the method."""
    from .task import check_aggregation

    options = dataclasses.replace(options, name=args.strategy)
    check_aggregation(options.aggregation, canonical_method(args.method))
    return options


def _adapter_config(ctx: typer.Context, method: str, kind: str):
    """The method's config from the flags (without ``--target-modules``, each method's default)."""
    return method_config(ctx, method, task_type="SEQ_CLS" if kind == "classification" else "CAUSAL_LM")


@fed_app.command(context_settings=METHOD_COMMAND)
@_run_options
def simulate(
    ctx: typer.Context,
    data: Path = typer.Option(..., exists=True, help="Training rows (.jsonl/.csv/...), split over the clients."),
    eval_data: Optional[Path] = typer.Option(None, exists=True,
                                             help="The server's evaluation rows (default: --eval-share of --data)."),
    clients: int = typer.Option(8, min=1, help="Simulated clients."),
    partition: str = typer.Option("iid", help=_PARTITION_HELP),
    dropout: float = typer.Option(0.0, help="Each client fails a round with this probability (failure drill)."),
    eval_share: float = typer.Option(0.1, help="Share of --data the server holds out (without --eval-data)."),
    backend: str = typer.Option("ray", help="ray (Flower's simulation engine) or in-process (no Ray; sequential)."),
    cpus_per_client: float = typer.Option(1.0, help="Ray CPUs per client: how many clients train at once."),
    gpus_per_client: float = typer.Option(0.0, help="Ray GPUs per client (e.g. 0.25: four clients share a GPU)."),
    verbose: bool = typer.Option(False, help="Show Flower's and Ray's own logs."),
    args: FedArgs = None,
    options: StrategyOptions = None,
    config: ConfigFile = None,
) -> None:
    """Simulate a federation on this machine: the data split over N clients, R rounds of Flower."""
    from ..formats import atomic_write
    from ..models import load_tokenizer
    from .partition import parse_partition
    from .rounds import latest_round
    from .simulate import BACKENDS, prepare_data, simulate as run

    out = args.out
    if latest_round(out) is not None and not args.resume:
        raise ValueError(f"{out} already holds round checkpoints; pass --resume to continue that run, "
                         f"or choose another --out")
    spec = parse_partition(partition)
    options = _strategy(args, options)
    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    tokenizer = load_tokenizer(args.model)
    fed_data = prepare_data(str(data), tokenizer, clients=clients, partition=spec, seed=args.seed,
                            eval_source=str(eval_data) if eval_data else None, eval_share=eval_share,
                            max_length=args.max_length)
    adapter = _adapter_config(ctx, args.method, fed_data.encoded.kind)
    settings = args.settings(adapter, options, kind=fed_data.encoded.kind, label_names=fed_data.encoded.label_names,
                             pad_id=tokenizer.pad_token_id, clients=clients)
    typer.echo(f"data: {fed_data.encoded.summary()}; the server holds out {len(fed_data.eval_rows):,} rows")
    typer.echo(f"partition {spec} over {clients} clients:")
    for line in fed_data.lines[:16] + ([f"... ({clients - 16} more)"] if clients > 16 else []):
        typer.echo("  " + line)
    typer.echo(f"{adapter.method} adapter, {options.name} strategy, {options.aggregation} aggregation, "
               f"{options.sampled(clients)} of {clients} clients per round, {backend} backend")
    atomic_write(out / "settings.json", lambda p: p.write_text(settings.to_json() + "\n"))
    run(settings.task(), fed_data.partitions, settings.server_spec(resume=args.resume), eval_rows=fed_data.eval_rows,
        dropout=dropout, backend=backend, cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client,
        report=typer.echo, verbose=verbose)
    typer.echo(f"global adapter: {out / 'adapter'}; per-round metrics: {out / 'history.jsonl'}; "
               f"bytes: {out / 'traffic.json'}")


@fed_app.command(context_settings=METHOD_COMMAND)
@_run_options
def server(
    ctx: typer.Context,
    eval_data: Path = typer.Option(..., exists=True, help="The server's evaluation rows; they also fix the row kind "
                                                           "and the label names every client must use."),
    clients: int = typer.Option(2, min=1, help="Clients (SuperNodes) in the federation; rounds wait for all of them."),
    host: str = typer.Option("127.0.0.1", help="Address the SuperLink listens on. The default accepts clients on "
                                                "this machine only; --host 0.0.0.0 (every network interface) lets "
                                                "SuperNodes on other machines connect, and anyone who can reach "
                                                "the port (plain HTTP, no authentication)."),
    port: int = typer.Option(8000, help="The SuperLink's port (clients and `flwr run` connect to it)."),
    start_superlink: bool = typer.Option(True, help="Start a SuperLink here; --no-start-superlink uses a running one."),
    dry_run: bool = typer.Option(False, help="Write the Flower App and print the commands, run nothing."),
    args: FedArgs = None,
    options: StrategyOptions = None,
    config: ConfigFile = None,
) -> None:
    """Serve a real federation: a Flower SuperLink, then the run; clients join with `peftlab fed client`."""
    import subprocess
    import time

    from ..data import encode_records, read_records
    from ..models import load_tokenizer
    from .deploy import flower_env, run_command, superlink_command, write_flower_app, write_flower_config

    options = _strategy(args, options)
    tokenizer = load_tokenizer(args.model)
    encoded = encode_records(list(read_records(eval_data)), tokenizer, max_length=args.max_length)
    adapter = _adapter_config(ctx, args.method, encoded.kind)
    settings = args.settings(adapter, options, kind=encoded.kind, label_names=encoded.label_names,
                             pad_id=tokenizer.pad_token_id, clients=clients)
    app_dir = write_flower_app(args.out / "flower-app", settings, eval_data=str(eval_data), resume=args.resume)
    # `flwr run` reaches the SuperLink here: on the loopback unless it listens on one address only.
    control = "127.0.0.1" if host in _ANY_ADDRESS else host
    flwr_home = write_flower_config(args.out / "flwr-home", f"{control}:{port}")
    link, submit = superlink_command(host, port), run_command(app_dir)
    env = flower_env(flwr_home)
    where = "<this machine's address>" if host in _ANY_ADDRESS else host
    typer.echo(f"Flower App: {app_dir / 'pyproject.toml'}; clients join with: peftlab fed client --superlink "
               f"{where}:{port} --data <their file>")
    if host in _LOOPBACK:
        typer.echo(f"the SuperLink listens on {host} only (this machine); pass --host 0.0.0.0 to let SuperNodes "
                   f"on other machines connect")
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
