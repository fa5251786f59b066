"""keymiss's private folders for its embedded server: made with a pid file that the running keymiss
holds locked for its whole life, and those of runs that ended without removing theirs (a ``kill
-9``) removed by the next start."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import stat
import tempfile
import time

from keymiss.valkey.serverconf import SOCKET_NAME

#: keymiss's private folders in the temporary directory: ``<prefix>XXXXXXXX``, made by mkdtemp
WORKDIR_PREFIX = "keymiss-valkey-"
#: in each, the pid of the keymiss that made it and that process's start time
PID_FILE = "keymiss.pid"


def _process_start(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of process ``pid`` from ``/proc`` (Linux), or None where there is
    no such process (or no ``/proc``). The start time tells a reused pid from the one recorded."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _record() -> str:
    started = _process_start(os.getpid())
    return f"{os.getpid()} {started[1] if started else ''}".strip() + "\n"


def _alive(record: str) -> bool:
    """Whether the keymiss a folder's pid file names still runs (ValueError: not a record)."""
    pid_text, _, start = record.strip().partition(" ")
    pid = int(pid_text)
    if pid <= 0:
        raise ValueError(record)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user holds the pid now: not ours to judge
    now = _process_start(pid)
    if now is None:  # no /proc: the pid exists, which is all there is to know
        return True
    state, started = now
    return state not in ("Z", "X") and (not start or started == start)


def _locked_by_another(fd: int) -> bool:
    """Whether another process holds the lock on ``fd``'s file; when not, this process holds it now."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    return False


#: an earlier release's folder: no pid file, its configuration (with a password) on disk. Removed
#: only when older than this many seconds and its server's socket no longer answers.
LEGACY_CONFIG = "valkey.conf"
LEGACY_AGE = 3600.0
_PASSWORD_LINE = re.compile(rb"^\s*(requirepass\s|user\s.*\s\"?>)", re.MULTILINE)


def _answers(sock_path: str) -> bool:
    """Whether a server still listens on the unix socket ``sock_path``."""
    if not os.path.exists(sock_path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(sock_path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # cannot tell: leave it alone
    return True


def _legacy_stale(path: str, now: float) -> bool:
    """An earlier release's folder that nothing uses: only regular files and sockets in it, a
    ``valkey.conf`` holding a password, nothing in it changed within ``LEGACY_AGE``, and no server
    answering on its socket."""
    conf = os.path.join(path, LEGACY_CONFIG)
    try:
        newest = os.stat(path, follow_symlinks=False).st_mtime
        with os.scandir(path) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode)) or st.st_uid != os.getuid():
                    return False
                newest = max(newest, st.st_mtime)
        fd = os.open(conf, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            text = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
    except OSError:
        return False
    if not _PASSWORD_LINE.search(text) or now - newest < LEGACY_AGE:
        return False
    return not _answers(os.path.join(path, SOCKET_NAME))


def remove_stale_workdirs(base: str | None = None) -> list[str]:
    """Remove the private folders of keymiss runs that ended without removing theirs (a ``kill
    -9``): folders in the temporary directory named like keymiss's, owned by this user, holding a
    pid file that no running keymiss holds locked (every run holds an exclusive ``flock`` on its
    own for its whole life, which a keymiss in another PID namespace shares) and whose keymiss no
    longer runs. Also an earlier release's folders (no pid file, a ``valkey.conf`` with a
    password): when nothing in them changed for an hour and no server answers on their socket.
    Anything else is left alone. The folders removed."""
    removed: list[str] = []
    base = base or tempfile.gettempdir()
    now = time.time()
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(WORKDIR_PREFIX) and _stale(entry, now):
            removed.append(entry.path)
    return removed


def _stale(entry: os.DirEntry[str], now: float) -> bool:
    """Remove ``entry``'s folder if it is a dead run's (see ``remove_stale_workdirs``): whether it did."""
    fd = -1
    try:
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return False
        try:
            fd = os.open(os.path.join(entry.path, PID_FILE), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if not _legacy_stale(entry.path, now):
                return False  # being made, or not keymiss's, or still in use
        else:
            if _locked_by_another(fd):
                return False  # a running keymiss holds it, whatever its pid means here
            if _alive(os.read(fd, 100).decode("ascii")):
                return False
        shutil.rmtree(entry.path, ignore_errors=True)  # with the lock held: no run takes it meanwhile
        return True
    except (OSError, ValueError, UnicodeDecodeError):
        return False  # not a pid file keymiss wrote
    finally:
        if fd >= 0:
            os.close(fd)


def make_workdir() -> tuple[str, int]:
    """A new private folder (0700) with this process's pid file in it, and the descriptor that
    holds the file's exclusive lock: kept open for as long as the folder is in use."""
    path = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    partial = os.path.join(path, PID_FILE + ".new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # before the file has its name: never seen unlocked
    os.write(fd, _record().encode("ascii"))
    os.replace(partial, os.path.join(path, PID_FILE))  # whole, or not there: never half a record
    return path, fd
