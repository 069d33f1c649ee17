"""Train a diffusion teacher from data (the shipped digits teacher: configs/digits/teacher.yaml)."""

import sys

from onestep.cli import main


if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
