"""Write the mode-coverage benchmark's image folder (onestep.data.modes): `python scripts/make_modes_data.py OUT_DIR
[--mode-set squares|secondaries] [--num-images N] [--seed S]`; train a teacher on it with configs/modes/teacher.yaml
and pass the same --mode-set to `onestep bench --suite modes`."""

import argparse
import sys
from pathlib import Path

from onestep.data.modes import MODE_SETS, mode_set, write_modes_folder
from onestep.errors import UserInputError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--num-images", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode-set", default="squares", help=f"one of {sorted(MODE_SETS)}")
    args = parser.parse_args()
    try:
        print(write_modes_folder(args.out, args.num_images, args.seed, mode_set(args.mode_set)))
    except UserInputError as err:
        print(f"make_modes_data: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
