"""Request-parser fuzzing for a fixed time: only commands or protocol errors, never anything else,
and the hiredis fast path never disagrees with the exact parser."""

from __future__ import annotations

import os
import random
import time

from keymiss.server.resp import ProtocolError, RequestParser

from ..server.test_resp import FRAGMENTS, multibulk, run_parser

SECONDS = float(os.environ.get("KEYMISS_FUZZ_SECONDS", "8"))


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            break
        op = rng.randrange(4)
        i = rng.randrange(len(b))
        if op == 0:
            b[i] = rng.randrange(256)
        elif op == 1:
            del b[i]
        elif op == 2:
            b.insert(i, rng.choice(b"*$\r\n0123456789-+%~>_ \"'\\"))
        else:
            b[i:i] = b[i : i + rng.randint(1, 8)]
    return bytes(b)


def test_fuzz_request_parser() -> None:
    rng = random.Random(2024)
    deadline = time.monotonic() + SECONDS
    cases = 0
    while time.monotonic() < deadline:
        cmds = [
            [rng.randbytes(rng.randint(0, 12)) for _ in range(rng.randint(1, 4))]
            for _ in range(rng.randint(1, 4))
        ]
        valid = b"".join(multibulk(*c) for c in cmds)
        seed = rng.randrange(1 << 16)
        # accepted input round-trips
        assert run_parser(valid, seed, True) == cmds
        # mutated and spliced input: the same verdict from both paths, and only protocol errors
        data = mutate(rng, valid + b"".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 3))))
        fast = run_parser(data, seed, True)
        assert fast == run_parser(data, seed, False), data
        for item in fast:
            assert isinstance(item, list | bytes)
        p = RequestParser()
        try:
            p.feed(data)
            while p.next() is not None:
                pass
        except ProtocolError:
            pass
        cases += 1
    assert cases > 1000
