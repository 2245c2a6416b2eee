"""``python -m opara_nb``: the command line (see opara_nb.cli)."""
from __future__ import annotations

from .cli import main

raise SystemExit(main())
