"""Who is calling and what it may do: OAuth 2 scopes and ownership, decided without I/O.

A caller is what a verified access token says (``service.infra.identity`` checks the token;
``service.edge.http.auth`` turns it into a ``Caller``). A scope ending in ``:any`` acts for
every customer; its plain form acts only for the customer the token's subject is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgspec

from service.kernel.domain import Command, CreateOrder, Order
from service.kernel.errors import AccessDenied


class Scope(enum.StrEnum):
    ORDERS_WRITE = "orders:write"  # create, change, place, cancel its own orders
    ORDERS_WRITE_ANY = "orders:write:any"  # the same for any customer (back office)
    ORDERS_READ = "orders:read"  # read its own orders, their history, its summary
    ORDERS_READ_ANY = "orders:read:any"  # the same for any customer; list every order
    PAYMENTS_WRITE = "payments:write"  # mark an order paid
    FULFILMENT_WRITE = "fulfilment:write"  # ship and deliver
    REPORTS_READ = "reports:read"  # daily sales
    OPS_READ = "ops:read"  # operations: status
    OPS_WRITE = "ops:write"  # operator actions


ALL_SCOPES: frozenset[str] = frozenset(Scope)


class Actor(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Who a change came from, as its events record it: the token's subject and, when the
    token names one, the OAuth client it was issued to."""

    sub: str
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller. ``actor`` is None only when authentication is off."""

    actor: Actor | None
    scopes: frozenset[str]

    @property
    def sub(self) -> str | None:
        return self.actor.sub if self.actor is not None else None

    def has(self, scope: Scope) -> bool:
        return scope in self.scopes

    def require(self, *any_of: Scope) -> None:
        """Refuse a caller that holds none of ``any_of``."""
        if not any(scope in self.scopes for scope in any_of):
            raise AccessDenied(any_of)

    def customer_limit(self, own: Scope, every: Scope) -> str | None:
        """The one customer this caller may act for with ``own`` (its subject), or None when
        ``every`` lets it act for any customer; neither scope: refused."""
        if every in self.scopes:
            return None
        if own in self.scopes and self.actor is not None:
            return self.actor.sub
        raise AccessDenied((own, every))


# Authentication off (local work only): every scope, no known actor.
UNAUTHENTICATED = Caller(actor=None, scopes=ALL_SCOPES)


def owns(owner: str | None, order: Order) -> bool:
    """Whether a caller that may act only for the customer ``owner`` (None: for every customer)
    may act on ``order``."""
    return owner is None or order.customer_id == owner


def order_seen_by(owner: str | None, command: Command, order: Order | None) -> Order | None:
    """The state of its order that ``command`` is decided on, for a caller that may act only for
    the customer ``owner`` (None: for every customer).

    Another customer's order is withheld: the command is decided as if the order did not exist,
    so it is refused exactly as on a missing order (the same ``OrderNotFound``, and an If-Match
    compared with version 0). A customer never learns that another customer's order exists.
    A ``CreateOrder`` for another customer is refused (``AccessDenied``); one for the caller's
    own customer sees the order as it is, since the service, not the client, picks order ids.
    """
    if isinstance(command, CreateOrder):
        if owner is not None and command.customer_id != owner:
            raise AccessDenied((Scope.ORDERS_WRITE_ANY,))
        return order
    if order is None or owns(owner, order):
        return order
    return None
