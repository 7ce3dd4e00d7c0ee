"""The ServerApp and ClientApp of a real deployment, as Flower loads them by name
(``peftlab.fed.app:server_app`` / ``peftlab.fed.app:client_app`` in the Flower App that
``peftlab fed server`` writes).

Both read the run's :class:`~peftlab.fed.settings.FedSettings` from Flower's run config
(key ``settings``, JSON). A client's private data is named by its SuperNode: ``peftlab fed client
--data FILE`` starts one with ``--node-config data="FILE"``; the file never leaves that machine.
"""

from __future__ import annotations

from functools import cache

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .client import make_client_app
from .server import make_server_app
from ..models import load_tokenizer
from .settings import FedSettings

server_app = ServerApp()
client_app = ClientApp()


def settings_of(context: Context) -> FedSettings:
    return FedSettings.from_json(str(context.run_config["settings"]))


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    settings = settings_of(context)
    eval_data = context.run_config.get("eval-data", "")
    eval_rows = settings.encode(str(eval_data), load_tokenizer(settings.model)) if eval_data else []
    resume = bool(context.run_config.get("resume", False))
    app = make_server_app(settings.task(), settings.server_spec(resume=resume), eval_rows=eval_rows,
                          report=lambda line: print(line, flush=True))
    app(grid, context)


@cache
def _client(settings_json: str, data: str) -> ClientApp:
    """One ClientApp per (run settings, data file) in this process: its model and rows are reused."""
    settings = FedSettings.from_json(settings_json)
    rows = settings.encode(data, load_tokenizer(settings.model))
    return make_client_app(settings.task(), lambda context: rows)


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    data = context.node_config.get("data")
    if not data:
        raise ValueError("this SuperNode names no data file; start it with `peftlab fed client --data FILE` "
                         "(or flower-supernode --node-config 'data=\"FILE\"')")
    return _client(str(context.run_config["settings"]), str(data))(message, context)
