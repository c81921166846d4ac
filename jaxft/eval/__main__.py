"""`python -m jaxft.eval`: see `jaxft.eval.cli`."""

import sys

from jaxft.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
