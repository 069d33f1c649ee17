"""Convert a trusted, pickled FID Inception weights file (.pth) to safetensors, once.

    python scripts/convert_inception_weights.py weights-inception-2015-12-05-6726825d.pth OUT.safetensors

The .pth is read with `torch.load(weights_only=True)` and checked against the FID Inception-v3's state dict; the
safetensors file then loads with no pickle (`onestep fid --inception-weights OUT.safetensors`).
"""

import argparse
import json
import sys

from onestep.errors import UserInputError
from onestep.eval.inception import convert_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the pickled weights file (.pth)")
    parser.add_argument("out", help="the safetensors file to write")
    args = parser.parse_args(argv)
    try:
        print(json.dumps({"out": str(convert_weights(args.source, args.out))}))
    except UserInputError as err:
        print(f"convert_inception_weights: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
