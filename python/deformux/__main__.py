"""``python3 -m deformux``: the command line (deformux/cli.py), the same as the ``deformux`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
