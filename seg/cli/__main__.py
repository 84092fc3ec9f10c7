import sys

from seg.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
