"""`onestep tiny` as a script."""

import sys

from onestep.cli import main


if __name__ == "__main__":
    sys.exit(main(["tiny", *sys.argv[1:]]))
