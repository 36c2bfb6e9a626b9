"""`python -m instructkit` = the `instructkit` command."""

import sys

from instructkit.cli import main

sys.exit(main())
