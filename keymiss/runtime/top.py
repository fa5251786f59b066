"""``keymiss top``: a live terminal view of any keymiss server, read from ``INFO`` once a second.

Both front ends (the module inside Valkey / Redis, and the Python server) report one vocabulary in
``INFO keymiss`` (``keymiss.stats.SHARED_KEYSPACE_FIELDS``), so one view reads either unchanged:
a field a server does not keep (the module's per-keyspace evictions, say) shows as ``-``.
Computations per second are the change of ``computations`` between two reads over the time between
them. Exits on ``q`` or Ctrl-C, leaving the terminal as it found it.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from keymiss.stats import INFO_KEYSPACE_LINE, from_info_name, printable

#: the per-keyspace columns: (title, INFO field or a derived name)
COLUMNS = (
    ("keyspace", "pattern"),
    ("hits", "hits"),
    ("misses", "misses"),
    ("hit ratio", "hit_ratio"),
    ("comp/s", "rate"),
    ("queued", "queued"),
    ("in flight", "in_flight"),
    ("p50", "p50_compute_seconds"),
    ("p99", "p99_compute_seconds"),
    ("errors", "errors"),
    ("timeouts", "timeouts"),
    ("stale hits", "stale_hits"),
    ("evictions", "evictions"),
)


#: the INFO sections the view reads (both servers take several at once)
SECTIONS = ("server", "clients", "memory", "stats", "keymiss")


@dataclass
class Snapshot:
    """One read of a server's INFO: its plain ``field:value`` lines, and each keyspace's fields."""

    at: float
    fields: dict[str, str] = field(default_factory=dict)
    keyspaces: dict[str, dict[str, str]] = field(default_factory=dict)


def _keyspace_fields(value: str) -> dict[str, str]:
    """``pattern=…,hits=…,…`` as a dict, the pattern decoded (both servers percent-encode a comma,
    an equals sign or a control character in it: ``keymiss.stats.info_name``); a part without
    ``=`` is still kept with the field before it."""
    out: dict[str, str] = {}
    last = None
    for part in value.split(","):
        name, eq, v = part.partition("=")
        if eq:
            out[name], last = v, name
        elif last is not None:
            out[last] += "," + part
    if "pattern" in out:
        out["pattern"] = from_info_name(out["pattern"])
    return out


def parse_info(text: str, at: float = 0.0) -> Snapshot:
    """An ``INFO`` reply as a Snapshot. Only ``keymiss_keyspace_<n>`` lines are keyspaces (the
    Python server's earlier ``keyspace_<n>`` alias lines are left out)."""
    snap = Snapshot(at)
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if not sep or line.startswith("#"):
            continue
        if name.startswith(INFO_KEYSPACE_LINE):
            ks = _keyspace_fields(value)
            snap.keyspaces[ks.get("pattern", name)] = ks
        else:
            snap.fields[name] = value
    return snap


def _seconds(text: str | None, computed: bool) -> str:
    if text is None or not computed:
        return "-"
    s = float(text)
    return f"{s * 1000:.1f}ms" if s < 1 else f"{s:.2f}s"


def rows(now: Snapshot, before: Snapshot | None) -> list[list[str]]:
    """The table's rows: one per keyspace, in the server's order, each cell a string."""
    out = []
    for pattern, ks in now.keyspaces.items():
        hits, misses = int(ks.get("hits", 0)), int(ks.get("misses", 0))
        computed = int(ks.get("computations", 0)) > 0
        rate = "-"
        if before is not None and pattern in before.keyspaces and now.at > before.at:
            done = int(ks.get("computations", 0)) - int(before.keyspaces[pattern].get("computations", 0))
            rate = f"{max(done, 0) / (now.at - before.at):.1f}"
        derived = {
            "hit_ratio": f"{hits / (hits + misses):.1%}" if hits + misses else "-",
            "rate": rate,
            "p50_compute_seconds": _seconds(ks.get("p50_compute_seconds"), computed),
            "p99_compute_seconds": _seconds(ks.get("p99_compute_seconds"), computed),
            "errors": ks.get("errors", ks.get("failures", "-")),
        }
        out.append([derived.get(name, ks.get(name, "-")) for _, name in COLUMNS])
    return out


def summary(now: Snapshot) -> str:
    """The line above the table: the server, its clients, memory and evictions."""
    f = now.fields
    version = f.get("valkey_version") or f.get("redis_version", "?")
    front = "python server" if "keymiss_version" in f else f"{f.get('server_name', 'redis')} + module"
    workers = f.get("keymiss_workers")
    parts = [
        f"{front} {version}",
        f"clients {f.get('connected_clients', '?')}",
        f"memory {f.get('used_memory_human', '?')} / {f.get('maxmemory_human', '?')}",
        f"evicted {f.get('evicted_keys', '?')}",
    ]
    if workers is not None:
        parts.append(f"workers {workers}")
    return "  ".join(parts)


def render(now: Snapshot, before: Snapshot | None, address: str, height: int | None = None) -> Any:
    """The screen: a summary line and the per-keyspace table (a rich renderable). With ``height``
    (the terminal's lines) the table keeps to it, so the footer always shows: the busiest keyspaces
    first, and a last row counting the ones left out."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(expand=False, header_style="bold")
    for title, _ in COLUMNS:
        table.add_column(title, justify="left" if title == "keyspace" else "right", no_wrap=True)
    shown = rows(now, before)
    room = None if height is None else max(1, height - 7)  # summary, borders, header, footer
    if room is not None and len(shown) > room:
        busiest = sorted(shown, key=lambda r: -sum(int(c) for c in r[1:3] if c.isdigit()))
        left = len(shown) - (room - 1)
        shown = [*busiest[: room - 1], [f"… {left} more keyspaces", *[""] * (len(COLUMNS) - 1)]]
    for row in shown:  # Text, never markup: a keyspace named "[bold]x:*" shows as that
        table.add_row(*(Text(printable(cell)) for cell in row))
    head = Text(printable(f"keymiss top — {address}  {summary(now)}"), style="bold")
    foot = Text(f"{time.strftime('%H:%M:%S')}  q: quit", style="dim")
    return Group(head, table, foot)


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """stdin in cbreak mode (one key at a time, no echo), restored on the way out; None when
    stdin is not a terminal (then only Ctrl-C ends the view)."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for a key; True when it is q (or Q)."""
    if fd is None:
        time.sleep(timeout)
        return False
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready) and os.read(fd, 32).lower().startswith(b"q")


def connect(host: str, port: int, password: str | None, user: str | None) -> Any:
    """A redis-py client whose INFO replies come back as the server's text."""
    import redis

    client = redis.Redis(
        host=host, port=port, username=user, password=password, socket_timeout=5, decode_responses=True
    )
    client.set_response_callback("INFO", lambda reply, **_: reply)
    return client


def _login_hint(exc: Exception, password: str | None) -> str:
    """What to do when the server wants a login the view did not give (its own words, a HELLO's
    or a NOAUTH, do not say how keymiss top takes one)."""
    import redis

    text = str(exc)
    wanted = isinstance(exc, redis.AuthenticationError) or any(
        word in text for word in ("NOAUTH", "HELLO must be called", "Authentication required")
    )
    if not wanted or password is not None:
        return ""
    return " (the server wants a password: pass --password, or KEYMISS_PASSWORD, and --user for an ACL user)"


def run_top(
    host: str, port: int, *, password: str | None, user: str | None, interval: float, once: bool
) -> int:
    """Show the view until q or Ctrl-C (or one frame with ``once``); 0 on a clean exit, 1 when the
    server cannot be read."""
    import redis
    from rich.console import Console
    from rich.live import Live

    client = connect(host, port, password, user)
    address = f"{host}:{port}"
    console = Console()
    if not console.is_terminal:  # piped (--once into a file): every column, not 80 characters
        console = Console(width=160)

    def read() -> Snapshot:
        return parse_info(client.execute_command("INFO", *SECTIONS), time.monotonic())

    try:
        now = read()
        if once:
            console.print(render(now, None, address))
            return 0
        before: Snapshot | None = None

        def frame() -> Any:  # kept to the terminal's height, read each time (it may be resized)
            return render(now, before, address, console.size.height)

        with _keys() as fd, Live(frame(), console=console, auto_refresh=False) as live:
            while not _quit_pressed(fd, interval):
                before, now = now, read()
                live.update(frame(), refresh=True)
        return 0
    except KeyboardInterrupt:
        return 0
    except redis.RedisError as exc:
        print(f"keymiss top: {address}: {exc}{_login_hint(exc, password)}", file=sys.stderr)
        return 1
    finally:
        client.close()
