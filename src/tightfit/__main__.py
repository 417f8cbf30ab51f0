"""``python -m tightfit``: the same command line as the ``tightfit`` script."""

import sys

from tightfit.cli import main

if __name__ == "__main__":
    sys.exit(main())
