"""One client connection: bytes in, commands dispatched in order, replies out, with flow control.

Commands are answered inline while they can be (hits, pings, writes to in-process stores). A command
that must wait — a miss being computed — is finished by a task, and the connection reads no further
commands from its buffer until it is done, so pipelined replies keep their order. Reading pauses when
the client stops reading replies (the transport's write buffer is full) or piles up input behind a
waiting command; a client whose unread replies pass the output limit, or stay unread too long, is
disconnected so it cannot hold memory hostage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, cast

from keymiss.errors import BusyError, KeymissError, ReplyError
from keymiss.runtime.net import unacknowledged
from keymiss.server import reply, resp
from keymiss.server.client import Transaction
from keymiss.server.commands import TABLE, Command, error_reply
from keymiss.server.passthrough import Relay, changed_by
from keymiss.server.transactions import IMMEDIATE, queue, snapshot
from keymiss.stores.base import PINNED_PREFIX, Item, LocalStore, SharedStore

if TYPE_CHECKING:
    from keymiss.server.client import Host

log = logging.getLogger("keymiss.server")
access = logging.getLogger("keymiss.access")

#: Replies built before they are handed to the transport (which may then pause us).
FLUSH_BYTES = 64 * 1024
#: Input kept buffered behind a waiting command before the socket stops being read.
READ_PAUSE_BYTES = 1024 * 1024
NOAUTH = b"-NOAUTH Authentication required.\r\n"
_OWN = PINNED_PREFIX.encode()

#: Commands of the data types an in-process store does not hold: named as such, not as unknown.
OTHER_TYPES = frozenset(
    b"hset hsetnx hget hmset hmget hgetall hdel hlen hexists hkeys hvals hincrby hincrbyfloat hstrlen "
    b"hscan hrandfield lpush rpush lpushx rpushx lpop rpop llen lrange lindex lset lrem ltrim linsert "
    b"lpos lmove blpop brpop blmove rpoplpush sadd srem smembers sismember smismember scard spop "
    b"srandmember sinter sunion sdiff sinterstore sunionstore sdiffstore smove sscan sintercard zadd "
    b"zrem zscore zincrby zcard zcount zrange zrangebyscore zrevrange zrank zrevrank zpopmin zpopmax "
    b"zscan zunionstore zinterstore zrangestore zmscore xadd xrange xrevrange xlen xread xreadgroup "
    b"xgroup xack xdel xtrim xinfo xclaim xautoclaim xpending pfadd pfcount pfmerge geoadd geopos "
    b"geodist geosearch georadius setbit getbit bitcount bitpos bitop bitfield".split()
)


def _printable(raw: bytes) -> str:
    """Bytes for a log line with every control and non-ASCII byte escaped: a key cannot forge lines."""
    return repr(raw)[2:-1]


class Connection(asyncio.Protocol):
    """The asyncio protocol of one client."""

    def __init__(self, server: Host) -> None:
        self.server = server
        self.km = server.km
        s = server.settings
        self.parser = resp.RequestParser(
            max_bulk=s.size("max_bulk"), max_args=s.max_args, max_inline=s.size("max_inline")
        )
        self.query_limit = s.size("query_buffer")
        self.output_limit = s.size("output_buffer")
        self.id = next(server.ids)
        self.proto = 2
        self.name = ""
        self.lib: dict[str, str] = {}
        self.authenticated = s.requirepass is None
        store = self.km.store
        self.shared: SharedStore | None = store if isinstance(store, SharedStore) else None
        self.transport: asyncio.Transport | None = None
        self.addr = "?"
        self.laddr = "?"
        self.waiting = False
        self.close_after_reply = False
        self.closed = False
        self.write_paused = False
        self.write_paused_since = 0.0
        self.sent = 0  # reply bytes handed to the transport
        self.taken = 0  # of which the client had acknowledged at the stall timer's last look
        self.fd = -1  # the socket's descriptor, where the transport has one (for unacknowledged)
        self.read_paused = False
        self.created = time.monotonic()
        self.last_active = self.created
        self.last_cmd = b"NULL"
        self.partial_since = 0.0  # when the unfinished request now buffered began arriving (0: none)
        self._progressed = False
        self._task: asyncio.Task[None] | None = None
        self.multi: Transaction | None = None  # the commands queued since MULTI
        self.watched: dict[str, Item | None] = {}  # WATCHed keys and the value each held then
        self.watch_dirty = False  # a watched key was written since WATCH
        self.in_exec = False  # running EXEC's commands: a miss starts its computation, replies nil
        self.exec_task: asyncio.Future[bytes] | None = None  # an EXEC that had to wait, running

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @authenticated.setter
    def authenticated(self, value: bool) -> None:
        self._authenticated = value
        self.parser.authenticated = value  # unauthenticated clients may only send small requests

    # --- transport callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they have the same methods
        self.transport = t = cast(asyncio.Transport, transport)
        peer = t.get_extra_info("peername")
        sock = t.get_extra_info("sockname")
        self.addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.laddr = f"{sock[0]}:{sock[1]}" if isinstance(sock, tuple) else str(sock)
        srv = self.server
        srv.total_connections += 1
        if len(srv.connections) >= srv.settings.max_clients:
            srv.rejected_connections += 1
            t.write(b"-ERR max number of clients reached\r\n")
            t.close()
            self.closed = True
            return
        t.set_write_buffer_limits(high=256 * 1024)
        raw = t.get_extra_info("socket")
        with contextlib.suppress(AttributeError, OSError, ValueError):
            self.fd = int(raw.fileno()) if raw is not None else -1
        srv.connections[self.id] = self

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.pop(self.id, None)
        self._forget_state()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the computation itself is shielded and goes on for others

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_active = time.monotonic()
        parser = self.parser
        parser.feed(data)
        # Complete commands are processed as they come, as Redis does, and never count against
        # --query-buffer: ``_process`` checks it once only an unfinished command is left. While a
        # command waits (or replies go unread), reading pauses past READ_PAUSE_BYTES instead.
        if not self.waiting:
            self._process()
            if self.closed:
                return
        self._flow()
        # The request timer runs from a request's first byte to its last, whatever the parser
        # holds: a complete argument of an unfinished command is no progress towards its end.
        if parser.partial and not self.waiting:
            if not self.partial_since or self._progressed:
                self.partial_since = self.last_active  # timed from the start of *this* request
        else:
            self.partial_since = 0.0

    def _over_query_limit(self) -> bool:
        """Close a client whose query buffer (the bytes and arguments of its one unfinished
        command; complete commands were processed before) passed ``--query-buffer``, with an
        error line; True if it was closed."""
        held = self.parser.held
        if held <= self.query_limit:
            return False
        log.warning("closing client %s: query buffer over %d bytes", self.addr, self.query_limit)
        self.parser.reset()
        self.closed = True
        self.server.connections.pop(self.id, None)
        self._forget_state()
        t = self.transport
        if t is not None:
            t.write(
                b"-ERR Protocol error: query buffer of %d bytes is over the limit of %d bytes "
                b"(--query-buffer)\r\n" % (held, self.query_limit)
            )
            t.close()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_since = time.monotonic()
        self.taken = self.acknowledged()
        self._flow()

    def unsent(self) -> int:
        """Reply bytes still in the transport's buffer."""
        t = self.transport
        return t.get_write_buffer_size() if t is not None and not self.closed else 0

    def acknowledged(self) -> int:
        """Reply bytes the client has taken: all handed to the transport, less what it buffers and
        what the kernel holds unacknowledged (where the kernel says; else what it accepted)."""
        queued = unacknowledged(self.fd) if not self.closed else None
        return self.sent - self.unsent() - (queued or 0)

    def reading_replies(self, now: float) -> bool:
        """Whether the client took some of its replies since the last look, counted at the socket:
        a slow but steady reader is never stalled (the stall timer restarts)."""
        taken = self.acknowledged()
        if taken > self.taken:
            self.taken = taken
            self.write_paused_since = now
            return True
        return False

    def resume_processing(self) -> None:
        """Go on with the commands buffered while another client's EXEC ran."""
        if self.server.exclusive is None:
            self._process()
            self._flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._flow()
        if not self.waiting and not self.closed:
            self._process()

    # --- processing ----------------------------------------------------------------------------
    def _flow(self) -> None:
        """Pause reading while replies go unread or input piles up behind a waiting command."""
        if self.closed or self.transport is None:
            return
        pause = self.write_paused or (self.waiting and self.parser.pending > READ_PAUSE_BYTES)
        if pause and not self.read_paused:
            self.transport.pause_reading()
            self.read_paused = True
        elif not pause and self.read_paused:
            self.transport.resume_reading()
            self.read_paused = False

    def _process(self) -> None:
        holder = self.server.exclusive
        if holder is not None and holder is not self:  # another client's EXEC is running
            self.server.paused.add(self)
            return
        out: list[bytes] = []
        out_bytes = 0
        parser = self.parser
        self._progressed = False
        starved = False  # stopped for want of bytes: what is left is one unfinished command
        while not self.write_paused and not self.close_after_reply and not self.closed:
            try:
                args = parser.next()
            except resp.ProtocolError as exc:
                log.info("protocol error from %s: %s", self.addr, exc)
                out.append(exc.reply)
                self.close_after_reply = True
                break
            if args is None:
                starved = True
                break
            self._progressed = True
            answer = self._dispatch(args)
            if type(answer) is not bytes:
                if out:
                    self._write(b"".join(out))
                self.waiting = True
                pending = cast(Awaitable[bytes], answer)
                self._task = asyncio.get_running_loop().create_task(self._complete(pending))
                return
            out.append(answer)
            out_bytes += len(answer)
            if out_bytes >= FLUSH_BYTES:
                # Replies leave as they are made, not all at the end of what one read brought: a
                # client that pipelines GETs of a large value and never reads pauses us (write
                # buffer full) after a chunk, instead of having every reply built in memory first.
                self._write(b"".join(out))
                out.clear()
                out_bytes = 0
        if out and not self.closed:
            self._write(b"".join(out))
        if starved and self._over_query_limit():  # its arguments read so far count too
            return
        if self.close_after_reply and self.transport is not None:
            self.transport.close()

    def _dispatch(self, args: list[bytes]) -> bytes | Awaitable[bytes]:
        srv = self.server
        srv.total_commands += 1
        name = args[0].lower()
        cmd = TABLE.get(name)
        self.last_cmd = name
        if srv.access_log:
            access.info(
                "%s %s %s%s",
                self.addr,
                _printable(name[:32]).upper(),
                _printable(args[1][:200]) if len(args) > 1 and name not in (b"auth", b"hello") else "",
                f" (+{len(args) - 2} args)" if len(args) > 2 else "",
                extra={"client": self.addr, "command": _printable(name[:32])},
            )
        if cmd is None and self._authenticated and self.shared is not None:
            if self.multi is not None:  # checked at EXEC, as the whole transaction is relayed
                return queue(self, args, None)
            return self._passthrough(self.shared, args)
        if cmd is None and name in OTHER_TYPES:
            srv.error_replies += 1
            line = reply.error(
                f"ERR '{name.decode()}' works on a data type keymiss's Python server does not hold "
                "(it holds strings); serve with the default front end or a Redis store "
                "(--store redis://…) for lists, hashes, sets and the rest"
            )
            return line if self.multi is None else queue(self, args, line)
        if cmd is None:
            shown = ""
            for a in args[1:]:  # as Redis builds it: each argument quoted, trailing space, ~128 bytes
                if len(shown) >= 128:
                    break
                shown += f"'{a[: 128 - len(shown)].decode(errors='replace')}' "
            srv.error_replies += 1
            name_shown = args[0][:128].decode(errors="replace")
            line = reply.error(f"ERR unknown command '{name_shown}', with args beginning with: {shown}")
            return line if self.multi is None else queue(self, args, line)
        if not self._authenticated and "noauth" not in cmd.flags:
            srv.error_replies += 1
            return NOAUTH
        n = len(args)
        if (cmd.arity > 0 and n != cmd.arity) or n < -cmd.arity:
            srv.error_replies += 1
            line = reply.error(f"ERR wrong number of arguments for '{cmd.name}' command")
            return line if self.multi is None else queue(self, args, line)
        # leases, contexts and codec tags are keymiss's: no client command writes them
        if "write" in cmd.flags and any(k.startswith(_OWN) for k in self.key_args(cmd, args)):
            srv.error_replies += 1
            line = reply.error(
                f"ERR keys under '{PINNED_PREFIX}' are keymiss's own (leases, contexts); clients "
                "cannot write them (KEYMISS FORGET removes them by name)"
            )
            return line if self.multi is None else queue(self, args, line)
        if self.multi is not None and name not in IMMEDIATE:
            return queue(self, args, None)
        if srv.watches and "write" in cmd.flags and isinstance(store := self.km.store, LocalStore):
            watched = srv.watches.among(self.keys_of(cmd, args))
            if watched:  # compared before and after: only a real change fails a watcher's EXEC
                before = {k: snapshot(store.get_now(k)) for k in watched}
                try:
                    answer = cmd.handler(self, args)
                except Exception as exc:
                    return self.error(exc)
                if type(answer) is bytes:
                    srv.watches.touch_changed(store, before)
                    return answer
                return self._then_touch(store, before, answer)  # type: ignore[arg-type]
        try:
            return cmd.handler(self, args)
        except Exception as exc:
            return self.error(exc)

    async def _then_touch(
        self, store: LocalStore, before: dict[str, Item | None], pending: Awaitable[bytes]
    ) -> bytes:
        try:
            return await pending
        finally:
            self.server.watches.touch_changed(store, before)

    @staticmethod
    def key_args(cmd: Command, args: list[bytes]) -> list[bytes]:
        """The arguments that name keys, by the command's key positions."""
        if cmd.first_key <= 0:
            return []
        last = cmd.last_key if cmd.last_key >= 0 else len(args) + cmd.last_key
        return args[cmd.first_key : last + 1 : cmd.step]

    @classmethod
    def keys_of(cls, cmd: Command, args: list[bytes]) -> list[str] | None:
        """The keys a write command names (``None``: all of them, as FLUSHDB)."""
        if cmd.name in ("flushdb", "flushall"):
            return None
        return [a.decode("utf-8", "surrogateescape") for a in cls.key_args(cmd, args)]

    def dispatch_queued(self, args: list[bytes]) -> bytes | Awaitable[bytes]:
        """Run one command EXEC took from the queue."""
        return self._dispatch(args)

    async def settle(self, pending: Awaitable[bytes]) -> bytes:
        """The reply of a command that had to wait, its failure as an error reply."""
        try:
            return await pending
        except Exception as exc:
            return self.error(exc)

    def relay(self, args: list[bytes]) -> Awaitable[bytes]:
        """Relay ``args`` to the shared Redis (a command keymiss implements locally for in-process
        stores only, as INCR)."""
        assert self.shared is not None
        return self._passthrough(self.shared, args)

    def relay_rules(self, store: SharedStore) -> Relay:
        """The server's pass-through rules (learnt from the backing Redis), made on first use."""
        relay = self.server.relay
        if relay is None:
            relay = self.server.relay = Relay(store)
        return relay

    async def _passthrough(self, store: SharedStore, args: list[bytes]) -> bytes:
        """Relay a command keymiss does not own (HSET, LPUSH, …) to the backing Redis, if it is one
        that is safe on a shared connection (see ``passthrough``)."""
        try:
            rule, refusal = await self.relay_rules(store).check(args)
            if refusal is not None:
                raise ReplyError(refusal)
            keys = [k.decode("utf-8", "surrogateescape") for k in rule.keys(args)] if rule.write else []
        except ReplyError as exc:
            return reply.error(str(exc))
        except KeymissError as exc:
            return self.error(exc)
        self.km.writeback.writing(keys)  # a computation ending meanwhile waits (``superseding``)
        answer = b"-"
        try:
            answer = reply.encode(await store.raw(args, self.proto), self.proto)
        except (ReplyError, KeymissError) as exc:
            answer = reply.error(str(exc)) if isinstance(exc, ReplyError) else self.error(exc)
        finally:
            if keys and changed_by(args, answer):  # it changed them: the computation is not stored
                self.km.written(keys)
            self.km.writeback.landed(keys)
        return answer

    def error(self, exc: BaseException) -> bytes:
        """The error reply for ``exc``, counted; unexpected exceptions are logged with traceback."""
        srv = self.server
        srv.error_replies += 1
        if isinstance(exc, BusyError):
            srv.busy_rejections += 1
        line = error_reply(exc)
        if line.startswith(b"-ERR internal error"):
            log.error("command %r failed", self.last_cmd, exc_info=exc)
        return line

    async def _complete(self, pending: Awaitable[bytes]) -> None:
        try:
            answer = await pending
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.closed or (task is not None and task.cancelling()):
                return  # the client went away, or the server is closing it
            # the computation this command waited for was cancelled: the client still gets a reply
            answer = self.error(KeymissError("the computation was cancelled; retry"))
        except BaseException as exc:  # whatever a handler raised, this client gets an error reply
            answer = self.error(exc)
        self.waiting = False
        if self.closed:
            return
        self._write(answer)
        self._process()
        self._flow()

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        self.sent += len(data)
        transport.write(data)
        # The limit is on what stays unsent *behind* this reply: one reply larger than the limit
        # still streams to a client that reads (as in Redis); one that does not read is paused,
        # then closed by the stall timer.
        if transport.get_write_buffer_size() - len(data) > self.output_limit:
            log.warning(
                "closing client %s: %d bytes of replies unread", self.addr, transport.get_write_buffer_size()
            )
            self.server.output_disconnections += 1
            self.abort()

    def _forget_state(self) -> None:
        """A gone client's transaction state: its watches, and the hold an EXEC of its had."""
        self.multi = None
        self.server.watches.drop(self)
        self.server.paused.discard(self)
        running = self.exec_task is not None and not self.exec_task.done()
        if self.server.exclusive is self and not running:  # a running EXEC releases it when done
            self.server.release()

    def abort(self) -> None:
        self.closed = True
        self.server.connections.pop(self.id, None)
        self._forget_state()
        if self.transport is not None:
            self.transport.abort()

    def describe(self) -> str:
        """One CLIENT LIST line, with Redis's field names."""
        now = time.monotonic()
        obl = self.transport.get_write_buffer_size() if self.transport is not None and not self.closed else 0
        queued = -1 if self.multi is None else len(self.multi.commands)
        lib_name = self.lib.get("lib-name", "")
        lib_ver = self.lib.get("lib-ver", "")
        return (
            f"id={self.id} addr={self.addr} laddr={self.laddr} name={self.name} "
            f"age={int(now - self.created)} idle={int(now - self.last_active)} "
            f"flags={'b' if self.waiting else 'N'} "
            f"db=0 sub=0 psub=0 ssub=0 multi={queued} qbuf={self.parser.pending} omem={obl} "
            f"cmd={self.last_cmd.decode(errors='replace')} user=default resp={self.proto} "
            f"lib-name={lib_name} lib-ver={lib_ver}"
        )
