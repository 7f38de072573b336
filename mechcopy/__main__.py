"""`python -m mechcopy` is the `mechcopy` command."""

import sys

from mechcopy.commands import main

sys.exit(main())
