"""A real deployment on Flower's Deployment Runtime: one SuperLink (the server's side) and one
SuperNode per client, each on its own machine with its own private data.

``peftlab fed server`` writes a Flower App whose components are :mod:`peftlab.fed.app` and whose
run config carries the run's settings, starts a SuperLink (unless one runs already), submits the
app with ``flwr run`` and streams the server's log. ``peftlab fed client`` starts a SuperNode that
connects to the SuperLink's Fleet API and names its data file. Both use the Python environment
they run in (runtime dependency installation is off): install peftlab on every machine.

The commands are built here as argument lists, so they can be shown (``--dry-run``) or run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..formats import atomic_write
from .settings import FedSettings

PORT = 8000
"""The SuperLink's one HTTP port (Flower >= 1.40 serves its Fleet, Control and Runtime APIs on it)."""
CONNECTION = "peftlab"


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid TOML basic string


def write_flower_app(directory: Path, settings: FedSettings, *, eval_data: str | None, resume: bool) -> Path:
    """The Flower App (a ``pyproject.toml``) that runs ``settings`` with peftlab's apps."""
    text = "\n".join([
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "peftlab-fed"',
        'version = "1.0.0"',
        'description = "Federated adapter training with peftlab"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "peftlab"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "peftlab.fed.app:server_app"',
        'clientapp = "peftlab.fed.app:client_app"',
        "",
        "[tool.flwr.app.config]",
        f"settings = {_toml_string(settings.to_json())}",
        f"eval-data = {_toml_string(str(Path(eval_data).resolve()) if eval_data else '')}",
        f"resume = {'true' if resume else 'false'}",
        "",
    ])
    atomic_write(directory / "pyproject.toml", lambda p: p.write_text(text))
    return directory


def write_flower_config(flwr_home: Path, control_address: str) -> Path:
    """A Flower configuration naming the SuperLink connection ``peftlab`` (``flwr run`` reads it
    from ``$FLWR_HOME``, so the user's own ``~/.flwr`` is left alone)."""
    text = (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {_toml_string(control_address)}\ninsecure = true\n")
    atomic_write(flwr_home / "config.toml", lambda p: p.write_text(text))
    return flwr_home


def superlink_command(host: str = "127.0.0.1", port: int = PORT) -> list[str]:
    """Start a SuperLink listening on ``host:port``: SuperNodes and ``flwr run`` both connect there.
    The default, the loopback, admits this machine only; ``host="0.0.0.0"`` opens it to the network."""
    return ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(port)]


def run_command(app_dir: Path) -> list[str]:
    return ["flwr", "run", str(app_dir), CONNECTION, "--stream"]


def supernode_command(superlink: str, data: str, *, port: int = 9094) -> list[str]:
    """Start a SuperNode for the client whose private rows are in ``data``."""
    node_config = f"data={json.dumps(str(Path(data).resolve()))}"
    return ["flower-supernode", "--insecure", "--superlink", superlink, "--node-config", node_config,
            "--port", str(port)]


def flower_env(flwr_home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(flwr_home.resolve())}
