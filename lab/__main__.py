"""`python -m tortie.lab` is `tortie-lab`."""

import sys

from tortie.lab.cli import main

sys.exit(main())
