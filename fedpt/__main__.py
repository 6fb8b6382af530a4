"""`python -m fedpt` is the `fedpt` command (torchrun relaunches use this form)."""

import sys

from fedpt.cli import main

sys.exit(main())
