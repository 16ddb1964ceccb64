import sys

from spirtd.cli import main

sys.exit(main())
