"""Who is asking: the client identity every request carries through the core to the batcher.

The doors' authentication layer (`teacher_server.security`) decides who a call comes from, once
per call, and sets it with `set_current_client`; the core reads it with `current_client()` when it
queues the request, so the batcher can share forwards fairly between clients, cap each client's
queued rows and count per-client metrics. It travels in a `contextvars.ContextVar`: asyncio
copies it into every task a handler starts (a stream's per-batch tasks included), and no
transport signature has to carry it.

A client is named by its token's entry in the tokens file when tokens are configured, else by its
peer address (see `Settings.anonymous_client_key`). Work done by the server itself (repository
polling, background training) runs as `INTERNAL`.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass

INFER = "infer"
ADMIN = "admin"
SCOPES = frozenset({INFER, ADMIN})


@dataclass(frozen=True)
class Client:
    """One client as the batcher sees it. `weight`: its share of forwards relative to others
    (2.0 gets twice the rows of a 1.0 client when both wait); `max_queued_rows`: its own cap on
    rows waiting for a forward (None: the server's `client_max_queued_rows`)."""

    name: str
    scopes: frozenset[str] = frozenset({INFER})
    weight: float = 1.0
    max_queued_rows: int | None = None
    named: bool = False  # from the tokens file: always its own metrics label


INTERNAL = Client("internal", scopes=frozenset({INFER}), named=True)

_current: ContextVar[Client] = ContextVar("teacher_client", default=INTERNAL)


def current_client() -> Client:
    """The client of the call being handled (`INTERNAL` outside any call)."""
    return _current.get()


def set_current_client(client: Client) -> Token[Client]:
    return _current.set(client)


def reset_current_client(token: Token[Client]) -> None:
    _current.reset(token)
