"""``python -m fastnca``: the ``fastnca`` command (info, bench)."""
import sys

from .cli import main

sys.exit(main())
