"""The example keyspaces under their first name, so ``--app keymiss.examples:app`` (as earlier
releases documented it) keeps serving them; they live in ``keymiss.apps.examples``."""

from keymiss.apps.examples import app

__all__ = ["app"]
