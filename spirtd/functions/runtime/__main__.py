"""``python -m spirtd.functions.runtime``: a standalone function host (host.py)."""

import sys

from spirtd.functions.runtime.host import main

sys.exit(main())
