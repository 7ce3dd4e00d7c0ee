"""The Flower ServerApp: Flower's strategy loop over adapter arrays, with server-side evaluation,
byte accounting and a checkpoint of the global adapter after every round.

Round r, as ``Strategy.start`` runs it: sample clients, send each the global adapter, aggregate
the replies (failures are left out), then call our ``evaluate_fn``, which evaluates the new global
adapter on the server's held-out rows, writes ``rounds/round-00000r/`` and prints one line.
:class:`CountingGrid` sits between the strategy and Flower's grid and counts the bytes of every
message both ways.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from .. import formats
from ..model import DEFAULT, PeftModel, get_peft_model
from ..train import evaluate
from .comms import TrafficLog, human, model_bytes
from .rounds import latest_round, load_round, save_round
from .spec import ServerSpec
from .strategy import RoundLog, as_record, build_strategy
from .task import FedTask, stacked_rank, to_numpy, with_rank

HISTORY = "history.jsonl"
TRAFFIC = "traffic.json"


@dataclass
class FedResult:
    """What a federated run produced (filled in as rounds finish)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per round (round 0: the initial adapter): evaluation metrics, aggregated training
    metrics, clients sent / failed, bytes down / up."""
    traffic: TrafficLog | None = None
    arrays: dict[str, np.ndarray] | None = None
    """The final global adapter."""


def message_bytes(message: Message) -> int:
    """Payload bytes of the arrays a message carries (elements × bytes per element)."""
    if message.has_error():
        return 0
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
               for record in message.content.array_records.values() for a in record.values())


def short_reason(reason: str) -> str:
    """A client's error in one line. Under Ray, Flower's reason is a long traceback that ends in
    ``... occurred. Message: <the client's message>'>``; keep that message."""
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1].removesuffix("'>")
    return " ".join(reason.split())[:300]


def message_round(message: Message) -> int:
    return int(next(iter(message.content.config_records.values()))["server-round"])


class CountingGrid(Grid):
    """A :class:`~flwr.serverapp.Grid` that passes everything to ``grid`` and records, per round, the
    bytes sent and received (in ``traffic``) and how many clients failed or never answered."""

    def __init__(self, grid: Grid, traffic: TrafficLog) -> None:
        self.grid, self.traffic = grid, traffic
        self.failed: dict[int, int] = {}
        self.sent: dict[int, int] = {}
        self.errors: dict[int, list[str]] = {}
        """Per round, why clients failed (Flower's error reasons)."""

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        round = message_round(messages[0])
        self.traffic.record(round, down=[message_bytes(m) for m in messages],
                            up=[message_bytes(r) for r in replies if not r.has_error()])
        self.sent[round] = self.sent.get(round, 0) + len(messages)
        self.failed[round] = self.failed.get(round, 0) + len(messages) - sum(not r.has_error() for r in replies)
        self.errors.setdefault(round, []).extend(r.error.reason for r in replies if r.has_error())
        return replies


def set_global(model: PeftModel, task: FedTask, arrays: dict[str, np.ndarray]) -> None:
    """Load global adapter arrays into the server's model ("stack": at the arrays' rank)."""
    if task.aggregation == "stack":
        model.delete_adapter(DEFAULT)
        model.add_adapter(DEFAULT, with_rank(task.adapter, stacked_rank(arrays)))
        model.set_adapter(DEFAULT)
    model.load_adapter_state_dict(DEFAULT, {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})


def global_config(task: FedTask, arrays: dict[str, np.ndarray]):
    """The adapter config the global arrays belong to (its rank, for "stack")."""
    return with_rank(task.adapter, stacked_rank(arrays)) if task.aggregation == "stack" else task.adapter


def _server_optimizer(strategy: Any) -> Any | None:
    """The FedOpt strategy (FedAdam) inside wrappers, whose moments a checkpoint must keep."""
    while strategy is not None and not hasattr(strategy, "m_t"):
        strategy = getattr(strategy, "strategy", None)
    return strategy


def _optimizer_tensors(strategy: Any) -> dict[str, np.ndarray]:
    opt = _server_optimizer(strategy)
    if opt is None:
        return {}
    return {f"{name}/{k}": v for name in ("m_t", "v_t") for k, v in (getattr(opt, name) or {}).items()}


def _restore_optimizer(strategy: Any, tensors: dict[str, np.ndarray]) -> None:
    opt = _server_optimizer(strategy)
    if opt is None or not tensors:
        return
    for name in ("m_t", "v_t"):
        moments = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}
        setattr(opt, name, moments or None)


def progress_line(entry: dict[str, Any], rounds: int, traffic: TrafficLog) -> str:
    """``round 3/10: 8/8 clients ok, train-loss 0.812, accuracy 0.713, eval_loss 0.95 | down 2.3 MiB, up ...``"""
    parts = [f"round {entry['round']}/{rounds}:"]
    if entry["round"]:
        parts.append(f"{entry['clients'] - entry['failed']}/{entry['clients']} clients ok,")
    for key in ("train-loss", "svd-residual", "rank", "accuracy", "eval_loss", "perplexity"):
        if key in entry:
            value = entry[key]
            parts.append(f"{key} {value:.4g}," if isinstance(value, float) else f"{key} {value},")
    line = " ".join(parts).rstrip(",")
    if entry.get("failed"):
        line += f" ({entry['failed']} failed; first: {entry.get('first-error', 'no reply')[:120]})"
    if entry["round"]:
        line += (f" | down {human(entry['down'])}, up {human(entry['up'])}; total "
                 f"{human(traffic.total_down + traffic.total_up)} (full-model FedAvg: {human(traffic.full_model_total)})")
    return line


def make_server_app(task: FedTask, spec: ServerSpec, *, eval_rows: Sequence[dict] = (),
                    result: FedResult | None = None, report: Callable[[str], None] = print) -> ServerApp:
    """A ServerApp running ``spec.rounds`` rounds of ``task``; ``result`` (if given) is filled in."""
    result = result if result is not None else FedResult()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(spec.seed)  # the initial adapter is the same in every run with this seed
        base = task.build_base()
        result.traffic = TrafficLog(model_bytes(base))
        model = get_peft_model(base, task.adapter)
        arrays = to_numpy(model.adapter_state_dict(DEFAULT))
        first_round, optimizer_state = 1, {}
        checkpoint = latest_round(spec.out) if spec.out is not None else None
        if checkpoint is not None and not spec.resume:
            raise ValueError(f"{spec.out} already holds round checkpoints (newest: {checkpoint.name}); pass --resume to "
                             f"continue that run, or choose another --out")
        if checkpoint is not None:
            arrays, state, optimizer_state = load_round(checkpoint)
            changed = {k: (state["options"].get(k), v) for k, v in spec.fingerprint(task).items()
                       if state["options"].get(k) != v}
            if changed:
                described = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
                raise ValueError(f"cannot resume {checkpoint}: {described} since it was written; resume with the "
                                 f"same options or choose another --out")
            first_round = state["round"] + 1
            result.history, result.traffic = state["history"], TrafficLog.from_dict(state["traffic"])
            report(f"resuming from {checkpoint} (round {state['round']})")
        result.arrays = arrays
        if first_round > spec.rounds:
            report(f"all {spec.rounds} rounds are done already")
            return

        strategy = RoundLog(build_strategy(spec.strategy, clients=spec.clients, rank=getattr(task.adapter, "r", None)),
                            first_round=first_round, seed=spec.seed)
        _restore_optimizer(strategy, optimizer_state)
        counting = CountingGrid(grid, result.traffic)
        collate_fn = task.collate_fn()

        def evaluate_fn(server_round: int, record: ArrayRecord) -> MetricRecord | None:
            round = server_round + first_round - 1
            if server_round == 0 and first_round > 1:
                return None  # the resumed round was evaluated before the interruption
            arrays = {k: v.numpy() for k, v in record.items()}
            set_global(model, task, arrays)
            metrics = evaluate(model, eval_rows, collate_fn, batch_size=spec.eval_batch_size) if eval_rows else {}
            entry: dict[str, Any] = {"round": round, **strategy.train_metrics.get(round, {}), **metrics}
            if round:
                moved = [t for t in result.traffic.rounds if t.round == round]
                entry.update(clients=counting.sent.get(round, 0), failed=counting.failed.get(round, 0),
                             down=sum(t.down for t in moved), up=sum(t.up for t in moved))
                if counting.errors.get(round):
                    entry["first-error"] = short_reason(counting.errors[round][0])
            result.history.append(entry)
            result.arrays = arrays
            report(progress_line(entry, spec.rounds, result.traffic))
            if spec.out is not None and round:
                _write_outputs(Path(spec.out), round, task, spec, arrays, result, _optimizer_tensors(strategy))
            return MetricRecord({k: float(v) for k, v in metrics.items()})

        strategy.start(grid=counting, initial_arrays=as_record(arrays), num_rounds=spec.rounds - first_round + 1,
                       train_config=ConfigRecord({"seed": spec.seed}), evaluate_fn=evaluate_fn)
        report(result.traffic.summary())

    return app


def _write_outputs(out: Path, round: int, task: FedTask, spec: ServerSpec, arrays: dict[str, np.ndarray],
                   result: FedResult, optimizer: dict[str, np.ndarray]) -> None:
    """The round checkpoint, then the run's readable outputs (each file replaced atomically)."""
    config = global_config(task, arrays)
    state = {"options": spec.fingerprint(task), "history": result.history, "traffic": result.traffic.to_dict()}
    save_round(out, round, config=config, arrays=arrays, state=state, strategy_tensors=optimizer)
    formats.write_adapter(out / "adapter", config.to_dict(), {k: torch.from_numpy(v) for k, v in arrays.items()})
    formats.atomic_write(out / HISTORY, lambda p: p.write_text("".join(json.dumps(e) + "\n" for e in result.history)))
    formats.atomic_write(out / TRAFFIC, lambda p: p.write_text(json.dumps(result.traffic.to_dict(), indent=1) + "\n"))
