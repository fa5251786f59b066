"""The read contract's decision, as a pure function: each row of docs/architecture.md's table that
the Python read path decides, from (keyspace, the item found, now) alone; and the rules beside it
(refresh backoff, the stale window's storage, another node's refresh under a lease)."""

from __future__ import annotations

from typing import Any

import pytest

from keymiss.engine.freshness import (
    EARLY,
    FILL,
    HIDE,
    NIL,
    SERVE,
    STALE,
    VERSION_STALE,
    Decision,
    RefreshBackoff,
    decide,
    needs_expiry,
    outdated,
    refreshed_since,
    stored_ttl,
    xfetch,
)
from keymiss.keyspace import Keyspace
from keymiss.stores import Item

from ..conftest import FakeClock

NOW = 1_000_000.0
NEVER, ALWAYS = (lambda: 0.0), (lambda: 1.0 - 1e-12)  # XFetch's draw: never early, early if it can be


def _ks(**options: Any) -> Keyspace:
    return Keyspace("k:*", lambda key: key, **options)


def _computed(ks: Keyspace, seconds: float = 1.0) -> Keyspace:
    """``ks`` as if one handler call took ``seconds`` (what XFetch scales by)."""
    ks.stats.observe(seconds)
    return ks


def test_nothing_stored_is_a_fill_for_a_keyspace_and_nil_for_no_keyspace() -> None:
    assert decide(_ks(), None, NOW) is FILL
    assert decide(None, None, NOW) is NIL


def test_a_stored_value_is_served_with_or_without_a_keyspace() -> None:
    assert decide(_ks(), Item(b"v"), NOW) is SERVE
    assert decide(None, Item(b"v", expires_at=NOW + 1), NOW) is SERVE
    assert decide(_ks(ttl=10), Item(b"v", expires_at=NOW + 1), NOW) is SERVE  # no freshness asked


def test_past_the_ttl_inside_stale_is_served_and_refreshed() -> None:
    ks = _ks(ttl=10, stale=60)
    stored_until = NOW + 60  # the TTL ran out just now; kept for the stale window
    assert decide(ks, Item(b"v", expires_at=stored_until + 1), NOW, ALWAYS) is SERVE  # inside its TTL
    assert decide(ks, Item(b"v", expires_at=stored_until), NOW) is STALE
    assert decide(ks, Item(b"v", expires_at=NOW + 1), NOW) is STALE


def test_xfetch_refreshes_early_only_when_its_draw_says_so_and_never_in_the_first_half() -> None:
    ks = _computed(_ks(ttl=100, early_refresh=1.0), seconds=2.0)
    near_expiry = Item(b"v", expires_at=NOW + 1)
    assert decide(ks, near_expiry, NOW, ALWAYS) is EARLY
    assert decide(ks, near_expiry, NOW, NEVER) is SERVE
    young = Item(b"v", expires_at=NOW + 60)  # more than half its TTL left
    assert decide(ks, young, NOW, ALWAYS) is SERVE
    # before any computation was timed, XFetch has no delta to scale by: never early
    assert decide(_ks(ttl=100, early_refresh=1.0), near_expiry, NOW, ALWAYS) is SERVE
    assert xfetch(ks, remaining=1.0, draw=ALWAYS) and not xfetch(ks, remaining=1.0, draw=NEVER)


def test_the_virtual_clock_decides_how_much_life_is_left() -> None:
    ks = _computed(_ks(ttl=100, early_refresh=1.0), seconds=2.0)
    item = Item(b"v", expires_at=NOW + 100)
    draw = lambda: 0.5  # noqa: E731 - remaining <= 2 * ln 2 ~ 1.39 s draws early
    assert decide(ks, item, NOW, draw) is SERVE
    assert decide(ks, item, NOW + 98, draw) is SERVE  # 2 s left
    assert decide(ks, item, NOW + 99, draw) is EARLY  # 1 s left


class Versions:
    def __init__(self) -> None:
        self.current = "v1"

    def __call__(self) -> str:
        return self.current


def test_versions_hide_serve_previous_and_never_hide_a_clients_write() -> None:
    versions = Versions()
    ks = _ks(version=versions)
    v1 = Item(b"v", version=ks.version_tag())
    client = Item(b"written", version=None)
    assert decide(ks, v1, NOW) is SERVE
    versions.current = "v2"
    assert decide(ks, v1, NOW) is HIDE and outdated(ks, v1)
    assert decide(ks, client, NOW) is SERVE and not outdated(ks, client)

    rolling = _ks(version=Versions(), version_stale=60)
    v1 = Item(b"v", version=rolling.version_tag())
    assert callable(rolling.version)
    rolling.version.current = "v2"  # type: ignore[union-attr]
    assert decide(rolling, v1, NOW) is VERSION_STALE and not outdated(rolling, v1)


def test_a_failing_version_callable_hides_the_value() -> None:
    def broken() -> str:
        raise RuntimeError("registry down")

    ks = _ks(version=broken)
    assert decide(ks, Item(b"v", version=b"12345678"), NOW) is HIDE
    assert decide(ks, Item(b"v", version=None), NOW) is SERVE  # a client's write needs no version


def test_the_decisions_say_what_the_reader_gets() -> None:
    assert {d for d in Decision if d.served} == {SERVE, STALE, EARLY, VERSION_STALE}
    assert {d for d in Decision if d.refreshes} == {STALE, EARLY, VERSION_STALE}


def test_only_freshness_settings_need_the_values_own_expiry() -> None:
    assert not needs_expiry(None) and not needs_expiry(_ks(ttl=5))
    assert needs_expiry(_ks(ttl=5, stale=1)) and needs_expiry(_ks(ttl=5, early_refresh=1.0))


def test_a_value_is_kept_for_its_ttl_and_the_stale_window() -> None:
    assert stored_ttl(_ks(ttl=10, stale=60), 10) == 70
    assert stored_ttl(_ks(ttl=10), 10) == 10
    assert stored_ttl(_ks(ttl=10, stale=60), None) is None


def test_another_nodes_refresh_is_recognised() -> None:
    ks = _ks(ttl=100)
    seen = Item(b"old", expires_at=NOW + 10, version=ks.version_tag())
    assert not refreshed_since(seen, Item(b"old", expires_at=NOW + 10, version=seen.version), ks)
    assert refreshed_since(seen, Item(b"new", expires_at=NOW + 100, version=seen.version), ks)
    assert refreshed_since(seen, Item(b"client's", expires_at=None, version=None), ks)


@pytest.mark.parametrize("failures, wait", [(1, 1.0), (2, 2.0), (3, 4.0), (10, 60.0)])
def test_refresh_backoff_doubles_up_to_a_minute_on_its_clock(failures: int, wait: float) -> None:
    clock = FakeClock()
    backoff = RefreshBackoff(clock)
    assert backoff.allows("k")
    for _ in range(failures):
        backoff.failed("k")
    clock.advance(wait - 0.01)
    assert not backoff.allows("k") and backoff.allows("other")
    clock.advance(0.02)
    assert backoff.allows("k")
    backoff.succeeded("k")
    backoff.failed("k")  # after a success, the wait starts again at one second
    clock.advance(1.01)
    assert backoff.allows("k")
