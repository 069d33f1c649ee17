"""Benchmark run folders against their teacher (same as `onestep bench`)."""

import sys

from onestep.cli import main


if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
