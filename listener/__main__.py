"""Run the command line: `python -m listener`."""

from __future__ import annotations

import sys

from listener.cli import main

sys.exit(main())
