"""`python -m instructkit` = the `instructkit` command."""

import sys

from instructkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
