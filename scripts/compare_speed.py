"""Images/s of several exported pipelines, timed in turn (round-robin) so that a shared machine's load hits all alike.

    OMP_NUM_THREADS=1 python scripts/compare_speed.py runs/dmd2_15/pipeline runs/msd/pipeline runs/msd_small/pipeline

Prints one JSON line: per folder the median and each round's images/s (batch 256, one warm-up batch first).
"""

import argparse
import json
import statistics

from onestep.bench.compare import images_per_second
from onestep.sampling.inference import load_sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    samplers = {folder: load_sampler(folder) for folder in args.folders}
    rounds = {folder: [] for folder in samplers}
    for _ in range(args.rounds):
        for folder, sampler in samplers.items():
            rounds[folder].append(images_per_second(sampler, args.batch))
    summary = {f: {"median": statistics.median(v), "rounds": [round(x) for x in v]} for f, v in rounds.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
