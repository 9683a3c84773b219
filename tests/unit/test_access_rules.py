"""Pure parts of access control: the caller's scopes and customer, the token buckets, and the
settings that configure them."""

from __future__ import annotations

import pytest

from service.edge.bootstrap import access_for
from service.edge.http.limits import Backlog, TokenBuckets
from service.kernel.access import UNAUTHENTICATED, Actor, Caller, Scope
from service.kernel.errors import AccessDenied, EnvironmentProblem
from service.kernel.settings import Settings, parse_duration


def _caller(*scopes: Scope) -> Caller:
    return Caller(Actor(sub="c-1"), frozenset(scopes))


def test_a_plain_scope_acts_for_the_callers_own_customer_and_any_for_every_one() -> None:
    assert (
        _caller(Scope.ORDERS_READ).customer_limit(Scope.ORDERS_READ, Scope.ORDERS_READ_ANY) == "c-1"
    )
    both = _caller(Scope.ORDERS_READ, Scope.ORDERS_READ_ANY)
    assert both.customer_limit(Scope.ORDERS_READ, Scope.ORDERS_READ_ANY) is None
    with pytest.raises(AccessDenied) as refused:
        _caller(Scope.REPORTS_READ).customer_limit(Scope.ORDERS_READ, Scope.ORDERS_READ_ANY)
    assert refused.value.any_of == (Scope.ORDERS_READ, Scope.ORDERS_READ_ANY)


def test_require_names_the_scopes_that_would_do() -> None:
    _caller(Scope.PAYMENTS_WRITE).require(Scope.PAYMENTS_WRITE)
    with pytest.raises(AccessDenied, match="'payments:write'"):
        _caller(Scope.ORDERS_WRITE_ANY).require(Scope.PAYMENTS_WRITE)


def test_without_authentication_every_scope_acts_for_every_customer() -> None:
    assert UNAUTHENTICATED.customer_limit(Scope.ORDERS_WRITE, Scope.ORDERS_WRITE_ANY) is None
    assert UNAUTHENTICATED.sub is None


def test_a_bucket_gives_its_burst_then_its_rate() -> None:
    buckets = TokenBuckets(rate=2.0, burst=3)
    assert [buckets.take("a", 10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", 10.0) == pytest.approx(0.5)  # empty: one token back in 0.5 s
    assert buckets.take("a", 10.5) == 0.0
    assert buckets.take("b", 10.5) == 0.0  # every caller its own bucket
    assert buckets.take("a", 10.5) > 0
    assert buckets.take("a", 20.0) == 0.0  # refilled, but never past the burst
    assert [buckets.take("a", 20.0) for _ in range(3)][-1] > 0


def test_a_refused_request_spends_nothing() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1)
    assert buckets.take("a", 0.0) == 0.0
    for _ in range(100):  # hammering an empty bucket does not push the next token away
        assert buckets.take("a", 0.5) > 0
    assert buckets.take("a", 1.0) == 0.0


def test_buckets_of_quiet_callers_are_forgotten() -> None:
    buckets = TokenBuckets(rate=10.0, burst=10)  # full again after 1 s of quiet
    for n in range(1000):
        buckets.take(f"caller-{n}", 0.0)
    assert len(buckets) == 1000
    buckets.take("late", 5.0)
    assert len(buckets) == 1


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert TokenBuckets.retry_after(0.01) == 1
    assert TokenBuckets.retry_after(1.2) == 2


@pytest.mark.parametrize(
    ("raw", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800)]
)
def test_durations(raw: str, seconds: int) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["", "h", "1.5h", "-3s", "3w", "ten"])
def test_a_bad_duration_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(raw)


def test_authentication_on_without_an_identity_provider_refuses_to_start() -> None:
    with pytest.raises(EnvironmentProblem, match=r"ORDERS_JWT_ISSUER.*ORDERS_AUTH=off"):
        access_for(Settings())
    with pytest.raises(EnvironmentProblem, match="not both"):
        access_for(
            Settings(jwks_url="http://idp/jwks", jwks_file="/x", jwt_issuer="i", jwt_audience="a")
        )


def test_authentication_off_is_only_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_env().auth is True
    monkeypatch.setenv("ORDERS_AUTH", "off")
    assert access_for(Settings.from_env()).enabled is False
    monkeypatch.setenv("ORDERS_AUTH", "maybe")
    with pytest.raises(SystemExit, match="on or off"):
        Settings.from_env()


def _served(backlog: Backlog, *, per_second: float, seconds: float, start: float = 0.0) -> float:
    """Commands taken in and answered one at a time, at ``per_second``: the time after."""
    now = start
    for _ in range(int(per_second * seconds)):
        assert backlog.admit(now)
        now += 1 / per_second
        backlog.leave(now)
    return now


def test_the_backlog_takes_everything_until_a_rate_is_known() -> None:
    backlog = Backlog(0.3, floor=4)
    assert all(backlog.admit(0.0) for _ in range(1000))


def test_the_backlog_refuses_what_would_wait_longer_than_allowed() -> None:
    backlog = Backlog(0.3, floor=4)
    now = _served(backlog, per_second=100, seconds=2)
    assert backlog.rate == pytest.approx(100, rel=0.05)
    # 100 per second leave: 30 in flight is what 0.3 s holds; the 31st would wait longer.
    taken = [backlog.admit(now) for _ in range(40)]
    assert taken == [True] * 30 + [False] * 10
    assert backlog.in_flight == 30  # refusals are not counted
    backlog.leave(now)
    assert backlog.admit(now)


def test_below_the_floor_everything_is_taken() -> None:
    backlog = Backlog(0.3, floor=32)
    now = _served(backlog, per_second=10, seconds=2)  # 0.3 s at 10/s would hold only 3
    assert all(backlog.admit(now) for _ in range(32))
    assert not backlog.admit(now)


def test_the_rate_follows_a_slower_service_within_two_seconds() -> None:
    backlog = Backlog(0.3, floor=1)
    now = _served(backlog, per_second=1000, seconds=1)
    now = _served(backlog, per_second=100, seconds=2, start=now)
    assert backlog.rate < 200  # from 1000: within 2x of the new rate


def test_one_stalled_window_moves_the_rate_by_a_third() -> None:
    backlog = Backlog(0.3, floor=1)
    now = _served(backlog, per_second=1000, seconds=1)
    assert backlog.admit(now + 0.25)  # a window without a single answer
    assert backlog.rate == pytest.approx(1000 * 2 / 3, rel=0.05)
