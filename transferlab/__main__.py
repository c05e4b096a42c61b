"""`python -m transferlab`, which is also what `torchrun -m transferlab` runs: the command line."""

import sys

from .cli import main

sys.exit(main())
