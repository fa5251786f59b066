"""The public ``Keymiss``: the engine's read-through cache plus the keyspace builders apps bring.

The engine (``keymiss.engine``) knows no app; what builds a keyspace out of an app's objects (a
``transformers`` pipeline) is added here, above both, so that ``km.pipeline_keyspace(...)`` stays
one call for a user while the engine imports nothing of the apps.
"""

from __future__ import annotations

from typing import Any

from keymiss.apps.pipelines import add_pipeline_keyspace
from keymiss.engine import cache
from keymiss.keyspace import Keyspace


class Keymiss(cache.Keymiss):
    """A compute-on-miss cache (see ``keymiss.engine.cache.Keymiss``), with app keyspaces."""

    def pipeline_keyspace(
        self,
        pattern: str,
        pipe: Any,
        *,
        batch_size: int = 8,
        inputs: str | None = None,
        call_kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Keyspace:
        """A local ``transformers`` pipeline as a batched keyspace: ``GET sentiment:I loved it``
        runs ``pipe`` on the input the key carries (see ``keymiss.apps.pipelines``) and stores its
        result as JSON (a numpy array for feature extraction), versioned by the model's
        fingerprint."""
        return add_pipeline_keyspace(
            self, pattern, pipe, batch_size=batch_size, inputs=inputs, call_kwargs=call_kwargs, **options
        )
