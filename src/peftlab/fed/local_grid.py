"""An in-process transport for Flower apps: the ServerApp's messages go straight to a ClientApp
in the same process, one node after another.

Flower's simulation engine runs ClientApps in Ray workers; starting Ray takes tens of seconds and
a worker per CPU, which is right for experiments and wrong for a unit test or a two-core laptop.
:func:`run_in_process` runs the very same ``ServerApp`` / ``ClientApp`` objects — strategies,
messages, records and error replies are all Flower's — with only the transport swapped, the way
Flower's simulation engine reports them: a ClientApp that raises becomes an error reply
(``CLIENT_APP_RAISED_EXCEPTION``), which strategies count as a failure.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

_FIRST_NODE_ID = 1001  # node ids are opaque to apps; partitions are numbered 0..n-1 in node_config


class InProcessGrid(Grid):
    """A :class:`flwr.serverapp.Grid` whose nodes are ``num_nodes`` contexts in this process."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self.contexts = {
            _FIRST_NODE_ID + i: Context(run_id=run_id, node_id=_FIRST_NODE_ID + i,
                                        node_config={"partition-id": i, "num-partitions": num_nodes},
                                        state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # the SuperLink's job
            try:
                reply = self.client_app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 -- a failing client is a reply, as in Flower
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(server_app: ServerApp, grid: InProcessGrid) -> None:
    """Run ``server_app`` against the nodes of ``grid``, in this process."""
    # Who is sending, for the messages strategies create (Flower's simulation sets the same).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server_app(grid=grid, context=context)
