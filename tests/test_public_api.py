"""The public surface: an explicit ``__all__`` that names real objects, and the demo command."""

from __future__ import annotations

import inspect
import subprocess
import sys

import keymiss


def test_all_names_exist_and_are_unique() -> None:
    assert len(set(keymiss.__all__)) == len(keymiss.__all__)
    for name in keymiss.__all__:
        assert hasattr(keymiss, name), name


def test_all_lists_every_public_name() -> None:
    # submodules are reachable but are not part of the flat API
    public = {n for n in dir(keymiss) if not n.startswith("_") and not inspect.ismodule(getattr(keymiss, n))}
    assert public <= set(keymiss.__all__), public - set(keymiss.__all__)


def test_demo_command_shows_miss_hit_and_one_computation(tmp_path: object) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "keymiss", "demo", "--compute-seconds", "0.05"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "miss  GET square:12 -> '144'" in out
    assert "hit   GET square:12 -> '144'" in out
    assert "1000 concurrent GET square:7 -> '49', 1 computation" in out
    assert "computations=2" in out


def test_embedded_example_app_serves_its_keyspaces() -> None:
    import asyncio

    from keymiss.apps.examples import app

    async def main() -> list[object]:
        async with app:
            return await app.get_many(["square:3", "embed:a", "embed:b", "greet{t}_ada"])

    square, emb_a, emb_b, greet = asyncio.run(main())
    assert square == "9" and greet == "hello ada (shard t)"
    assert isinstance(emb_a, list) and len(emb_a) == 8 and emb_a != emb_b
    assert app.registry.route("embed:a").stats.calls == 1  # type: ignore[union-attr]


def test_every_keymiss_keymiss_makes_is_the_public_class() -> None:
    """Apps keymiss builds itself (the empty app, the examples, the bertqa app) have the whole
    public API, ``pipeline_keyspace`` included; the class keeps the plain metaclass."""
    from keymiss.qa import build_qa_app
    from keymiss.runtime.apps import load_app

    made = [load_app(None), load_app("keymiss.apps.examples:app"), build_qa_app()]
    for km in made:
        assert isinstance(km, keymiss.Keymiss) and callable(km.pipeline_keyspace)
    assert type(keymiss.Keymiss) is type


def test_earlier_names_still_load() -> None:
    """``--app keymiss.examples:app`` as earlier releases documented it, and
    ``keymiss.server.load_app``."""
    from keymiss.runtime.apps import load_app
    from keymiss.server import load_app as server_load_app

    assert server_load_app is load_app
    app = load_app("keymiss.examples:app")
    assert app is load_app("keymiss.apps.examples:app")
    assert {"square:*", "embed:*"} <= {ks.pattern for ks in app.keyspaces()}
