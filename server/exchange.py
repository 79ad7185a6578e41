"""One exchange with the sites: push a message to each, pull the replies, account for every site.

Flower's ``Grid.send_and_receive`` sleeps 3 s between polls in deployment; pushing and then
pulling every 0.1 s with the public ``push_messages`` / ``pull_messages`` returns as soon as the
last reply lands. Every exchange has a timeout; a site whose reply is missing when it expires,
or that sent an error reply, is named with the reason, and the run goes on with the others.

One pull can outlast the timeout: when a site dies while uploading its reply, Flower's grid retries
that reply's missing objects until the SuperLink's object-push session expires (180 s in Flower
1.42), and the other sites' replies wait behind it. So the loop always pulls once more after the
deadline before it names a site silent (:func:`_pull_until`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.errors import GenofedError
from common.records import RecordError, from_record

log = logging.getLogger("genofed.server")
POLL_S = 0.1


class TooFewSitesError(GenofedError):
    """Fewer sites than the run's minimum answered (or were online)."""


@dataclass
class ExchangeResult:
    """Replies by node id, and the sites that failed with their reasons."""

    replies: dict[int, Message] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_sent: dict[int, int] = field(default_factory=dict)
    """Bytes of each site's message (:func:`payload_bytes`)."""
    bytes_received: dict[int, int] = field(default_factory=dict)
    """Bytes of each site's reply."""

    def cost(self) -> dict[str, Any]:
        """What the exchange cost: wall seconds, the slowest handler's seconds, mean bytes per site each way.

        A site's handler time (compute and vault) comes in its reply's ``handler-seconds`` metric;
        the rest of the wall time is transport and process overhead.
        """
        handler = [float(dict(r.content.metric_records["metrics"]).get("handler-seconds", 0.0))
                   for r in self.replies.values() if "metrics" in r.content.metric_records]
        return {"seconds": round(self.seconds, 2), "handler_s": round(max(handler), 2) if handler else 0.0,
                "bytes_down": _mean_int(self.bytes_sent.get(n, 0) for n in self.replies),
                "bytes_up": _mean_int(self.bytes_received.values())}


def _mean_int(values: Iterable[int]) -> int:
    values = list(values)
    return round(sum(values) / len(values)) if values else 0


def _unreadable_arrays(content: RecordDict) -> str:
    """Why a reply's array records do not unpack (``""`` when they all do): a site's reply is untrusted input."""
    for name, record in content.array_records.items():
        try:
            from_record(record)
        except RecordError as exc:
            return f"malformed reply: record {name!r} is {exc}"
    return ""


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower ships it: each object of its tree, deflated, counted once.

    Flower sends a message as the objects of its content tree (records, arrays), each serialised
    by ``deflate``; an object that occurs twice (same ``object_id``) is sent once. Headers and
    transport framing are not counted.
    """
    sizes: dict[str, int] = {}
    stack: list[Any] = [content]
    while stack:
        obj = stack.pop()
        if obj.object_id in sizes:
            continue
        sizes[obj.object_id] = len(obj.deflate())
        stack.extend((obj.children or {}).values())
    return sum(sizes.values())


MAX_REASON = 600


def short_reason(reason: str) -> str:
    """One readable line of a site's error: the exception's own line, never a whole traceback.

    In the Simulation Engine an error reply's reason can hold a Ray traceback of several KB; the
    line that says what went wrong is its last one.
    """
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    line = lines[-1] if lines else "no reason given"
    return line if len(line) <= MAX_REASON else line[:MAX_REASON] + "..."


def wait_for_nodes(grid: Grid, *, minimum: int, timeout: float) -> list[int]:
    """Node ids online once at least ``minimum`` are; a clear error after ``timeout`` seconds."""
    start = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() - start > timeout:
            raise TooFewSitesError(f"only {len(nodes)} site(s) online after {timeout:.0f} s; the run needs at least "
                                   f"{minimum} (min-sites). Start more SuperNodes or lower min-sites.")
        time.sleep(0.5)


class PollingGrid(Grid):
    """A :class:`Grid` whose ``send_and_receive`` polls every ``POLL_S`` (Flower's sleeps 3 s).

    Everything else is the wrapped grid's, so Flower strategies and workflows handed this grid
    get replies as soon as they land, like genofed's own phases (:func:`exchange`).
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Any) -> None:  # noqa: D102 - Grid's
        self._grid.set_run(run)

    @property
    def run(self) -> Any:  # noqa: D102 - Grid's
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102 - Grid's
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102 - Grid's
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:  # noqa: D102 - Grid's
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102 - Grid's
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102 - Grid's
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull every ``POLL_S`` until every reply is in or ``timeout`` seconds pass."""
        pending = set(self._grid.push_messages(messages))
        replies: list[Message] = []

        def take(reply: Message) -> None:
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)

        _pull_until(self._grid, pending, take, start=time.monotonic(), timeout=timeout)
        return replies


def _pull_until(grid: Grid, pending: set[str], take: Callable[[Message], None], *, start: float,
                timeout: float | None) -> None:
    """Pull the ``pending`` message ids' replies every ``POLL_S`` until none is pending or time is up.

    ``take`` handles each reply and removes its id from ``pending``. The last pull always begins
    after the deadline, so replies that landed while an earlier pull was blocked are not lost.
    """
    while pending:
        overdue = timeout is not None and time.monotonic() - start >= timeout
        for reply in grid.pull_messages(list(pending)):
            take(reply)
        if overdue or not pending:
            return
        time.sleep(POLL_S)


def exchange(grid: Grid, nodes: Iterable[int], content_for: Callable[[int], RecordDict], *, message_type: str,
             group_id: str, timeout: float) -> ExchangeResult:
    """Send ``content_for(node)`` to every node and collect replies until all arrive or ``timeout``."""
    t0 = time.monotonic()
    sent = {}
    result = ExchangeResult()
    sizes: dict[int, int] = {}  # by id(content): phases often send every site the same content
    messages = []
    for node in nodes:
        content = content_for(node)
        if id(content) not in sizes:
            sizes[id(content)] = payload_bytes(content)
        result.bytes_sent[node] = sizes[id(content)]
        messages.append(Message(content, dst_node_id=node, message_type=message_type, group_id=group_id))
    for msg, mid in zip(messages, grid.push_messages(messages)):
        sent[mid] = msg.metadata.dst_node_id
    pending = set(sent)

    def take(reply: Message) -> None:
        mid = reply.metadata.reply_to_message_id
        if mid not in pending:
            return
        pending.discard(mid)
        node = sent[mid]  # error replies from the SuperLink carry node id 1: map by message id
        if reply.has_error():
            result.failures[node] = f"error code {reply.error.code}: {short_reason(reply.error.reason)}"
        elif problem := _unreadable_arrays(reply.content):
            result.failures[node] = problem
        else:
            result.replies[node] = reply
            result.bytes_received[node] = payload_bytes(reply.content)

    # The timeout counts from the moment every message is out.
    _pull_until(grid, pending, take, start=time.monotonic(), timeout=timeout)
    for mid in pending:
        result.failures[sent[mid]] = f"no reply within {timeout:.0f} s"
    result.seconds = time.monotonic() - t0
    return result
