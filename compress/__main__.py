"""``python -m compress``: the same command line as the ``compress`` console script."""

import sys

from compress.cli import main

if __name__ == "__main__":
    sys.exit(main())
