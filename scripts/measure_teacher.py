"""Measure a teacher's FD at several step counts and guidance scales (numbers for its model card).

    python scripts/measure_teacher.py onestep/assets/digits_teacher --out teacher.json
"""

import argparse
import json
from pathlib import Path

from onestep.bench.compare import teacher_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--ddim-steps", type=int, nargs="*", default=[1, 2, 4, 10, 50])
    parser.add_argument("--ddpm-steps", type=int, nargs="*", default=[1000])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--speed-batch", type=int, default=256, help="0 skips the images/s measurement")
    args = parser.parse_args()
    rows = teacher_report(Path(args.teacher), args.num_samples, args.ddim_steps, args.ddpm_steps, args.guidance,
                          speed_batch=args.speed_batch or None)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
