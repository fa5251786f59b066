"""Defects found by attacking the module front end from outside, each pinned in real servers:
fill tokens that could be predicted, workers that one hung keyspace could starve, queues held by
computations nobody waits for, one value that wiped the cache, fills lost to a CLUSTERDOWN window,
a noisy shutdown, and credentials refused without a count."""

from __future__ import annotations

import itertools

from keymiss.valkey import protocol

from ..redis_servers import RedisProcess
from .conftest import raw_worker

# --- fill tokens --------------------------------------------------------------------------------------

_MASK = (1 << 64) - 1
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _unshift(y: int, s: int) -> int:
    """The x with ``x ^ (x >> s) == y`` (64 bits)."""
    x = y
    for _ in range(64 // s + 1):
        x = y ^ (x >> s)
    return x & _MASK


def _mix(z: int) -> int:
    """splitmix64's finalizer, as the module once made its tokens (the top two bits cleared)."""
    z = ((z ^ (z >> 30)) * _C1) & _MASK
    z = ((z ^ (z >> 27)) * _C2) & _MASK
    return (z ^ (z >> 31)) & 0x3FFFFFFFFFFFFFFF


def _unmix(token: int) -> list[int]:
    """Every counter-plus-secret whose mixed value is ``token`` (its two cleared bits unknown)."""
    out = []
    for top in range(4):
        z = _unshift(token | (top << 62), 31)
        z = (z * pow(_C2, -1, 1 << 64)) & _MASK
        z = _unshift(z, 27)
        z = (z * pow(_C1, -1, 1 << 64)) & _MASK
        out.append(_unshift(z, 30))
    return out


def predicted_next(token: int, ahead: int = 16) -> set[int]:
    """The tokens that would follow ``token`` if tokens were a secret counter run through splitmix64:
    one observed token gives the secret away."""
    return {_mix((state + step) & _MASK) for state in _unmix(token) for step in range(1, ahead + 1)}


def test_the_predictor_predicts_splitmix64_tokens() -> None:
    secret = 0x1234_5678_9ABC_DEF0
    assert _mix(secret + 8) in predicted_next(_mix(secret + 7))


async def test_fill_tokens_are_unique_unordered_and_not_derived_from_one_another(
    server: RedisProcess,
) -> None:
    w = await raw_worker(server.port, protocol.register("t", "tok:*"))
    try:
        tokens = []
        for i in range(64):  # one key at a time: consecutive computations, consecutive tokens
            assert await w.call("EVAL", "return redis.call('GET', KEYS[1])", 1, f"tok:{i}") is None
            reply = await w.call(*protocol.take(10, 0, 10_000))
            assert len(reply) == 2, reply
            tokens.append(int(reply[1]))
        assert len(set(tokens)) == len(tokens)
        assert all(0 < t < 1 << 63 for t in tokens)
        steps = {b - a for a, b in itertools.pairwise(tokens)}
        assert len(steps) == len(tokens) - 1, "tokens advance by a constant step"
        assert tokens != sorted(tokens)
        for before, after in itertools.pairwise(tokens):
            assert after not in predicted_next(before), "the next token follows from the one before"
    finally:
        await w.close()
