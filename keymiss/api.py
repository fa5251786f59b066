"""The public ``Keymiss``: the engine's read-through cache plus the keyspace builders apps bring.

The engine (``keymiss.engine``) knows no app; what builds a keyspace out of an app's objects (a
``transformers`` pipeline) is added here, above both, so that ``km.pipeline_keyspace(...)`` stays
one call for a user while the engine imports nothing of the apps.
"""

from __future__ import annotations

from keymiss.apps.pipelines import add_pipeline_keyspace
from keymiss.engine import cache


class Keymiss(cache.Keymiss):
    """A compute-on-miss cache (see ``keymiss.engine.cache.Keymiss``), with app keyspaces."""

    #: ``km.pipeline_keyspace(pattern, pipe, batch_size=8, inputs=None, call_kwargs=None, **options)``:
    #: a local ``transformers`` pipeline as a batched keyspace (``GET sentiment:I loved it`` runs
    #: ``pipe`` on the input the key carries), its results stored as JSON (a numpy array for feature
    #: extraction), versioned by the model's fingerprint; see ``keymiss.apps.pipelines``
    pipeline_keyspace = add_pipeline_keyspace
