"""``python -m keymiss`` runs the command line."""

import sys

from keymiss.cli import main

sys.exit(main())
