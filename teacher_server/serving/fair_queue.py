"""The batcher's waiting room: deficit round-robin across clients, or first come, first served.

Fair mode (`FairQueue(fair=True)`) keeps one FIFO per client (so one client's requests, and one
stream's, stay in their order) and serves the clients in turn by deficit round-robin (Shreedhar
and Varghese, 1996): on its turn a client earns `quantum x weight` cost units (rows, or real
tokens for sequence models) and its requests leave while their cost fits what it has earned; what
is left over is kept for its next turn. Over a busy period every waiting client gets rows in
proportion to its weight, whatever the size of its requests.

A client that had nothing waiting enters a "new clients" round that goes before the round of
clients with a backlog, for one turn (the sparse-flow rule of FQ-CoDel, RFC 8290). So a light
client that sends one small request at a time joins the very next forward instead of waiting a
whole round behind every backlogged client; a client that stays busy drops to the regular round
after its first turn and gains nothing by it.

FIFO mode (`fair=False`) puts every request in one line in arrival order, as before fair
queuing: kept for comparison (bench/fairness.py) and as an escape hatch.

Both modes count each client's queued rows (for its cap and the metrics). Not thread-safe: the
batcher uses it from its event loop only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Flow(Generic[T]):
    name: str
    weight: float
    items: deque[tuple[str, int, int, T]] = field(default_factory=deque)  # client, rows, cost, item
    deficit: float = 0.0
    turn_started: bool = False


class FairQueue(Generic[T]):
    """Requests waiting for a forward, by client. `quantum`: cost units a weight-1 client earns
    per turn (the batcher uses 1/16 of a forward's budget)."""

    def __init__(self, quantum: int, fair: bool = True) -> None:
        if quantum < 1:
            raise ValueError(f"quantum: expected >= 1, got {quantum}")
        self.quantum = quantum
        self.fair = fair
        self._flows: dict[str, _Flow[T]] = {}
        self._new: deque[_Flow[T]] = deque()  # clients that were idle: one turn first
        self._old: deque[_Flow[T]] = deque()  # clients with a backlog, in turn
        self._queued_rows: dict[str, int] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def queued_rows(self, client: str) -> int:
        return self._queued_rows.get(client, 0)

    def queued_rows_by_client(self) -> dict[str, int]:
        return {name: rows for name, rows in self._queued_rows.items() if rows}

    def put(self, client: str, weight: float, rows: int, cost: int, item: T) -> None:
        """Queue `item` (of `rows` rows and `cost` cost units) for `client`; `weight` > 0."""
        key = client if self.fair else ""
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = _Flow(key, weight)
            self._new.append(flow)
        flow.weight = weight  # the latest credentials' weight
        flow.items.append((client, rows, cost, item))
        self._queued_rows[client] = self._queued_rows.get(client, 0) + rows
        self._count += 1

    def peek(self) -> T:
        """The request that leaves next (raises IndexError when empty). Stable: until `pop`, the
        same request, so a request that does not fit a forward is first in the next one."""
        return self._head()[0].items[0][3]

    @property
    def serving_new(self) -> bool:
        """Whether the request `peek` names belongs to a client that was idle (the new round)."""
        return bool(self._count) and self.fair and self._head()[1] is self._new

    @property
    def backlogged(self) -> bool:
        """Whether a client waits in the regular round (it had more than one turn's worth)."""
        return bool(self._old)

    def pop(self) -> T:
        """Remove and return the request `peek` names."""
        flow, ring = self._head()
        owner, rows, cost, item = flow.items.popleft()
        flow.deficit -= cost
        self._count -= 1
        left = self._queued_rows[owner] - rows
        if left:
            self._queued_rows[owner] = left
        else:
            del self._queued_rows[owner]
        if not flow.items:  # idle again: forgets its credit, comes back as a new client
            ring.popleft()
            del self._flows[flow.name]
        return item

    def items(self) -> list[T]:
        """Every waiting request (e.g. to fail them at shutdown), emptying the queue."""
        out = [entry[3] for flow in self._flows.values() for entry in flow.items]
        self._flows.clear()
        self._new.clear()
        self._old.clear()
        self._queued_rows.clear()
        self._count = 0
        return out

    # ---- internals ------------------------------------------------------------------------

    def _head(self) -> tuple[_Flow[T], deque[_Flow[T]]]:
        """The client whose turn it is and whose first request fits what it has earned; starts
        turns (crediting the quantum) and moves clients between rounds as it goes."""
        if not self._count:
            raise IndexError("peek from an empty FairQueue")
        if not self.fair:
            flow = self._new[0] if self._new else self._old[0]
            return flow, (self._new if self._new else self._old)
        while True:
            ring = self._new if self._new else self._old
            flow = ring[0]
            if not flow.turn_started:
                flow.turn_started = True
                flow.deficit += self.quantum * flow.weight
            if flow.items[0][2] <= flow.deficit:
                return flow, ring
            # its turn is over: to the back of the regular round, keeping what it earned
            ring.popleft()
            flow.turn_started = False
            self._old.append(flow)
