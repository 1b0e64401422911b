"""``python -m relcache.cli``: the ``relcache`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
