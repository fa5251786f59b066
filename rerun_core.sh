#!/bin/bash
# rerun_core.sh: re-check the transaction findings on the current code
cd /tmp/attack-python; PY=/work/main/.venv/bin/python
timeout 90 $PY strand.py 31002 3
timeout 30 $PY partial.py 31002
timeout 60 $PY interleave.py 31002 | tail -2
