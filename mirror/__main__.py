"""`python -m mirror`: the command line."""

import sys

from mirror.cli import main

sys.exit(main())
