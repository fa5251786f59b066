"""Client commands: PING, ECHO, QUIT, SELECT, AUTH, HELLO, CLIENT.

Split from the operator commands (``introspection``): these set up and change the state of the calling
connection itself (protocol version, authentication, name) and touch no keys.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from keymiss.server import reply, resp
from keymiss.server.commands import SYNTAX, CommandError, Reply, arg, command, to_int

if TYPE_CHECKING:
    from keymiss.server.client import Client

#: The Redis release whose commands and replies keymiss follows; clients that gate features on
#: the server version read it from HELLO and INFO.
REDIS_COMPAT_VERSION = "7.2.0"


@command(
    "ping",
    -1,
    flags=("fast",),
    group="connection",
    summary="Ping the server.",
    arguments=[arg("message", optional=True)],
)
def cmd_ping(c: Client, args: list[bytes]) -> Reply:
    if len(args) > 2:
        raise CommandError("ERR wrong number of arguments for 'ping' command")
    return reply.PONG if len(args) == 1 else reply.bulk(args[1])


@command(
    "echo", 2, flags=("fast",), group="connection", summary="Return the message.", arguments=[arg("message")]
)
def cmd_echo(c: Client, args: list[bytes]) -> Reply:
    return reply.bulk(args[1])


@command("quit", -1, flags=("noauth", "fast"), group="connection", summary="Close the connection.")
def cmd_quit(c: Client, args: list[bytes]) -> Reply:
    c.close_after_reply = True
    return reply.OK


@command(
    "select",
    2,
    flags=("fast",),
    group="connection",
    summary="Select database 0 (the only one).",
    arguments=[arg("index", "integer")],
)
def cmd_select(c: Client, args: list[bytes]) -> Reply:
    if to_int(args[1]) != 0:
        raise CommandError("ERR DB index is out of range")
    return reply.OK


def _check_password(c: Client, user: bytes, password: bytes) -> None:
    expected = c.server.settings.requirepass
    if expected is None:
        if user == b"default":  # user names are case-sensitive, as Redis's ACL users are
            c.authenticated = True
            return
        raise CommandError("WRONGPASS invalid username-password pair or user is disabled.")
    if user != b"default" or not hmac.compare_digest(password, expected.encode()):
        c.server.auth_failures += 1
        raise CommandError("WRONGPASS invalid username-password pair or user is disabled.")
    c.authenticated = True


@command(
    "auth",
    -2,
    flags=("noauth", "fast"),
    group="connection",
    summary="Authenticate the connection.",
    arguments=[arg("username", optional=True), arg("password")],
)
def cmd_auth(c: Client, args: list[bytes]) -> Reply:
    if len(args) > 3:
        raise CommandError(SYNTAX)
    if len(args) == 2 and c.server.settings.requirepass is None:
        raise CommandError(
            "ERR AUTH <password> called without any password configured for the default user. "
            "Are you sure your configuration is correct?"
        )
    user, password = (b"default", args[1]) if len(args) == 2 else (args[1], args[2])
    _check_password(c, user, password)
    return reply.OK


@command(
    "hello",
    -1,
    flags=("noauth", "fast"),
    group="connection",
    summary="Handshake: choose RESP2 or RESP3, optionally authenticate and name the connection.",
    arguments=[arg("protover", "integer", optional=True)],
)
def cmd_hello(c: Client, args: list[bytes]) -> Reply:
    proto = c.proto
    if len(args) >= 2:
        ver = resp.parse_int(args[1])
        if ver is None:
            raise CommandError("ERR Protocol version is not an integer or out of range")
        if ver not in (2, 3):
            raise CommandError("NOPROTO unsupported protocol version")
        proto = ver
    i = 2
    name: bytes | None = None
    while i < len(args):
        opt = args[i].lower()
        if opt == b"auth" and i + 2 < len(args):
            _check_password(c, args[i + 1], args[i + 2])
            i += 3
        elif opt == b"setname" and i + 1 < len(args):
            name = args[i + 1]
            i += 2
        else:
            raise CommandError(f"ERR Syntax error in HELLO option '{args[i].decode(errors='replace')}'")
    if not c.authenticated:
        raise CommandError(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the "
            "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
            "select the RESP protocol version at the same time"
        )
    if name is not None:
        _set_name(c, name)
    c.proto = proto
    info = {
        "server": "redis",
        "version": REDIS_COMPAT_VERSION,
        "proto": proto,
        "id": c.id,
        "mode": "standalone",
        "role": "master",
        "modules": [],
    }
    return reply.encode(info, proto)


def _set_name(c: Client, name: bytes) -> None:
    if any(ch <= 32 or ch > 126 for ch in name):
        raise CommandError("ERR Client names cannot contain spaces, newlines or special characters.")
    c.name = name.decode()


@command(
    "client",
    -2,
    flags=(),
    group="connection",
    summary="Inspect and name client connections.",
    subcommands=("id", "setname", "getname", "info", "list", "setinfo", "no-evict", "no-touch"),
)
def cmd_client(c: Client, args: list[bytes]) -> Reply:
    sub = args[1].lower()
    if sub == b"id" and len(args) == 2:
        return reply.integer(c.id)
    if sub == b"setname" and len(args) == 3:
        _set_name(c, args[2])
        return reply.OK
    if sub == b"getname" and len(args) == 2:
        return reply.null(c.proto) if not c.name else reply.bulk(c.name.encode())
    if sub == b"info" and len(args) == 2:
        return reply.verbatim(c.describe() + "\n", c.proto)
    if sub == b"list" and len(args) == 2:
        return reply.verbatim("".join(x.describe() + "\n" for x in c.server.connections.values()), c.proto)
    if sub == b"setinfo" and len(args) == 4:
        attr = args[2].lower()
        if attr not in (b"lib-name", b"lib-ver"):
            raise CommandError(f"ERR Unrecognized option '{args[2].decode(errors='replace')}'")
        # as Redis checks it (up to a NUL, C-string style): a space or newline would forge CLIENT LIST
        if any(ch < 33 or ch > 126 for ch in args[3].partition(b"\0")[0]):
            name = args[2].decode(errors="replace")
            raise CommandError(f"ERR {name} cannot contain spaces, newlines or special characters.")
        c.lib[attr.decode()] = args[3].decode(errors="replace")
        return reply.OK
    if sub in (b"no-evict", b"no-touch") and len(args) == 3:
        return reply.OK
    if sub in (b"id", b"setname", b"getname", b"info", b"list", b"setinfo"):
        raise CommandError(f"ERR wrong number of arguments for 'client|{sub.decode()}' command")
    raise CommandError(f"ERR unknown subcommand '{args[1].decode(errors='replace')}'. Try CLIENT HELP.")
