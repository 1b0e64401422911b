"""``python -m relcache``: the ``relcache`` command, for an environment whose scripts folder is not on PATH."""

import sys

from relcache.cli import main

if __name__ == "__main__":
    sys.exit(main())
