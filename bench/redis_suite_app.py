"""An app with no keyspaces, for ``bench/redis_suite.sh``: the server then answers as a plain
Redis would (nothing is computed), which is what Redis's own tests expect."""

from keymiss import Keymiss

app = Keymiss(store="memory")
