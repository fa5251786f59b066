"""Commands keymiss does not own (HSET, LPUSH, ZADD, …), relayed to the shared Redis it stores in.

Relayed commands run on pooled connections that every client of this node shares, so only commands
whose effect ends with their reply may pass: a ``MULTI``, ``SUBSCRIBE`` or ``MONITOR`` sent down a
shared connection would hand other clients' replies to the wrong socket. Scripts could run any
command (``EVAL "redis.call('flushall')"``), admin commands reconfigure a server other nodes depend
on, and blocking commands would hold a pooled connection for as long as a client likes; all of them
are refused with an error that says so. Writes to keymiss's own records (``keymiss:*``: leases,
contexts, codec tags) and publishing on its channels are refused too.

What a command is comes from the backing server itself (``COMMAND INFO``: flags, ACL categories,
key positions), asked once per command name, so a newer Redis's commands are judged by what they
are rather than by a list compiled here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from keymiss.errors import UNSURE
from keymiss.stores.base import PINNED_PREFIX, SharedStore

log = logging.getLogger("keymiss.server")

_OWN = PINNED_PREFIX.encode()

#: Refused by name whatever the server says about them, with the reason a client is shown.
_BY_NAME = {
    b"select": "keymiss serves database 0 only",
    b"swapdb": "keymiss serves database 0 only",
    b"move": "keymiss serves database 0 only",
    b"migrate": "it moves keys to another server",
    b"restore": "a serialized payload is restored only by a direct connection",
    b"restore-asking": "a serialized payload is restored only by a direct connection",
    b"cluster": "keymiss is not a cluster node; ask a Redis node",
    b"asking": "keymiss is not a cluster node; ask a Redis node",
    b"readonly": "keymiss is not a cluster node; ask a Redis node",
    b"readwrite": "keymiss is not a cluster node; ask a Redis node",
}

#: ACL categories that make a command unsafe on a shared connection, and why.
_BY_CATEGORY = {
    b"@admin": "an admin command",
    b"@dangerous": "an admin command",
    b"@scripting": "a script could run any command",
    b"@transaction": "it changes the connection's state",
    b"@connection": "it changes the connection's state",
    b"@pubsub": "pub/sub needs a connection of its own",
    b"@blocking": "a blocking command would hold a shared connection",
}

#: Commands of a refused category that are safe after all (stateless), with the condition.
_PUBLISH = (b"publish", b"spublish")
_UNBLOCKED = (b"xread", b"xreadgroup")  # blocking only with a BLOCK argument
#: @dangerous, yet neither admin nor stateful: KEYS for its O(N), which Redis's own users accept;
#: SORT and SORT_RO because BY/GET patterns reach keys they do not declare (no harm on one server;
#: a pattern or STORE under keymiss's own prefix is refused like any write to it)
_DANGEROUS_OK = (b"keys", b"sort", b"sort_ro")
_DESPITE = {b"@pubsub": _PUBLISH, b"@blocking": _UNBLOCKED, b"@dangerous": _DANGEROUS_OK}


@dataclass(frozen=True)
class Rule:
    """What keymiss does with one command: refuse it (``refusal``) or relay it, and where its keys
    are (``first``/``last``/``step`` as COMMAND INFO gives them; ``movable``: anywhere)."""

    refusal: str | None = None
    first: int = 0
    last: int = 0
    step: int = 0
    movable: bool = False
    write: bool = False
    subcommands: dict[bytes, Rule] = field(default_factory=dict)

    def keys(self, args: Sequence[bytes]) -> Sequence[bytes]:
        """The arguments that name keys (every argument where the server cannot say)."""
        if self.movable:
            return args[1:]
        if self.first <= 0 or self.step <= 0:
            return ()
        last = self.last if self.last >= 0 else len(args) + self.last
        return args[self.first : last + 1 : self.step]


_UNKNOWN = Rule()


def _text(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def rule_of(entry: Any) -> Rule:
    """A Rule from one COMMAND INFO entry: ``[name, arity, flags, first, last, step, categories,
    tips, key specs, subcommands]`` (Redis 6 stops after the categories)."""
    name = _text(entry[0]).lower()
    flags = {_text(f).lower() for f in entry[2] or ()}
    categories = {_text(c).lower() for c in (entry[6] if len(entry) > 6 else ()) or ()}
    subs = {}
    if len(entry) > 9 and entry[9]:
        for sub in entry[9]:
            sub_name = _text(sub[0]).lower().partition(b"|")[2]
            subs[sub_name] = rule_of(sub)
    refusal = _BY_NAME.get(name)
    if refusal is None and not subs:
        for cat, why in _BY_CATEGORY.items():
            if cat in categories and name not in _DESPITE.get(cat, ()):
                refusal = why
                break
    if refusal is None and b"noscript" in flags and not subs and name not in _UNBLOCKED:
        refusal = "it changes the connection's state"
    return Rule(
        refusal=refusal,
        first=int(entry[3]),
        last=int(entry[4]),
        step=int(entry[5]),
        movable=b"movablekeys" in flags,
        write=b"write" in flags or b"may_replicate" in flags,
        subcommands=subs,
    )


class Relay:
    """The pass-through of one node: rules learnt from the backing server, then the relay itself."""

    def __init__(self, store: SharedStore) -> None:
        self.store = store
        self._rules: dict[bytes, Rule] = {}

    async def rule(self, name: bytes) -> Rule:
        rule = self._rules.get(name)
        if rule is not None:
            return rule
        info = await self.store.raw([b"COMMAND", b"INFO", name])
        entry = info[0] if isinstance(info, list) and info else None
        if not entry:
            return _UNKNOWN  # the server will say "unknown command" itself; not remembered
        rule = rule_of(entry)
        if len(self._rules) < 4096:
            self._rules[name] = rule
        return rule

    async def check(self, args: list[bytes]) -> tuple[Rule, str | None]:
        """The rule for ``args`` and, if it is refused, the error line to send."""
        name = args[0].lower()
        shown = args[0][:64].decode(errors="replace")
        rule = await self.rule(name)
        if rule.subcommands and rule.refusal is None:
            if len(args) < 2:
                return rule, None  # the server answers the wrong number of arguments
            sub = rule.subcommands.get(args[1].lower())
            if sub is None:
                return rule, None
            rule, shown = sub, f"{shown} {args[1][:64].decode(errors='replace')}"
        if rule.refusal is not None:
            return rule, self.refused(shown, rule.refusal)
        if name in _UNBLOCKED and any(a.lower() == b"block" for a in args[1:]):
            return rule, self.refused(shown, "a blocking command would hold a shared connection")
        if name == b"copy" and any(a.lower() == b"db" for a in args[3:]):
            return rule, self.refused(shown, "keymiss serves database 0 only")
        if name in _PUBLISH and len(args) > 1 and args[1].startswith(_OWN):
            return rule, f"ERR channels under '{PINNED_PREFIX}' are keymiss's own"
        if rule.write and any(k.startswith(_OWN) for k in rule.keys(args)):
            return rule, f"ERR keys under '{PINNED_PREFIX}' are keymiss's own; they are not written through"
        return rule, None

    @staticmethod
    def refused(name: str, why: str) -> str:
        return f"ERR '{name}' is not passed through to the shared Redis ({why}); send it to Redis directly"


#: Write commands whose reply ``:0`` says they wrote nothing (a count of what they changed).
_ZERO_IS_NOTHING = frozenset(
    b"setnx msetnx renamenx copy hsetnx hdel sadd srem smove zrem lrem pfadd".split()
)
_NILS = (b"$-1\r\n", b"_\r\n", b"*-1\r\n")


def unsure(answer: bytes) -> bool:
    """An error reply saying the command may or may not have been applied (its reply timed out)."""
    return UNSURE.encode() in answer


def changed_by(args: Sequence[bytes], answer: bytes) -> bool:
    """Whether a write command relayed to the shared Redis (or run on it) changed its keys, read
    from its encoded reply: an error (unless its reply timed out: then it may have), a nil (SET XX
    of a missing key), SET NX GET's old value or a ``:0`` of a command that counts what it set says
    not; so do a rename onto itself and a SETRANGE of nothing, which Redis leaves alone. Anything
    else may have written; a delete always counts (the del-during row: a key deleted while it
    computes is computed again). Only a write that changed a key supersedes its computation, as
    only those raise the keyspace events the module acts on."""
    name = args[0].lower()
    if answer.startswith((b"-", b"!")):  # a reply that timed out may hide a write that landed
        return unsure(answer)
    opts = {a.lower() for a in args[3:]} if name == b"set" else set()
    if b"get" in opts:  # SET ... GET answers the old value: NX set only if there was none, XX only
        nil = answer in _NILS  # if there was one
        return nil if b"nx" in opts else (not nil if b"xx" in opts else True)
    if answer in _NILS:  # GETSET: nil for a key it created; GETDEL: a delete
        return name in (b"getset", b"getdel")
    if answer == b":0\r\n" and name in _ZERO_IS_NOTHING:
        return False
    if name in (b"rename", b"renamenx") and len(args) > 2 and args[1] == args[2]:
        return False
    return not (name == b"setrange" and len(args) > 3 and args[3] == b"")
