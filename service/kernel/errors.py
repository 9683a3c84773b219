"""The one error tree of the service: every error it raises on purpose is an ``OrdersError``.

Each family says who must act, and is translated once at each edge: to an RFC 9457 problem
in ``service/edge/http/problems.py`` and to a one-line message and exit code in
``service/edge/cli/advice.py``. Anything else that escapes is a bug, reported with its
traceback.
"""

from __future__ import annotations


class OrdersError(Exception):
    """Base of every error the service raises on purpose."""


class DomainError(OrdersError):
    """A command breaks a rule of the order lifecycle: the caller must change the command.

    ``code`` is stable (it becomes the problem type), ``message`` is for people.
    """

    code: str = "domain-error"  # each rule's own, set on its class (or on the instance)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Conflict(OrdersError):
    """The caller's view of an order, or of its own earlier request, is out of date."""


class Unavailable(OrdersError):
    """A part the service needs is away or busy for now: the same request may work later."""

    retry_after: int | None = 1  # seconds worth waiting before that; None: no estimate


class OperatorRefusal(OrdersError):
    """An operator command that would do harm, or clash with one running: nothing was done."""


class EnvironmentProblem(OrdersError):
    """Something outside the code is missing or wrong; the message says what to do."""


class BadEvent(OrdersError):
    """An event in the log that a reader cannot take as it is: its partition halts (or the
    operator parks it), it is never skipped silently."""


class AccessDenied(OrdersError):
    """The caller is authenticated but holds none of the scopes the request needs (a 403)."""

    def __init__(self, any_of: tuple[str, ...]) -> None:
        needed = " or ".join(f"'{scope}'" for scope in any_of)
        super().__init__(f"this request needs the scope {needed}, which the token does not grant")
        self.any_of = any_of
