"""FD-vs-step curve of a finished run from its kept checkpoints (`train.keep_checkpoints` > 1), under judges the run
did not evaluate while it trained (e.g. a t2i run of before the second judge: `--metrics fd_t2i_mlp`).

    python scripts/checkpoint_curve.py runs/t2i_dmd2 --metrics fd_t2i_mlp --every 1000 --out curve.json

Each checkpoint is loaded as `onestep export` loads the newest (EMA weights) and judged as the run's final
evaluation is (its eval settings: prompts, noise seed, sample count), with `--metrics` added to its metrics.
Prints one JSON line per checkpoint; `--out` writes them all, the form `onestep bench --suite convergence` reads
(a metrics.json `history`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from onestep.config import config_from, to_dict
from onestep.errors import UserInputError
from onestep.files import read_json, write_json_atomic
from onestep.runs import RUN_CONFIG, build_trainer
from onestep.training.checkpoints import complete_checkpoints, read_state


def judge_checkpoints(cfg, checkpoints: list[Path], metrics: list[str]) -> Iterator[dict]:
    """The run's evaluation (plus `metrics`) of each checkpoint in turn: one trainer, built once in a scratch run
    folder (the run's own is left as it is), resumes from each checkpoint."""
    with tempfile.TemporaryDirectory() as scratch:
        evaluation = dataclasses.replace(cfg.eval, metrics=[*cfg.eval.metrics, *metrics])
        run_cfg = dataclasses.replace(cfg, output_dir=scratch, eval=evaluation)
        write_json_atomic(Path(scratch) / RUN_CONFIG, to_dict(run_cfg))  # the scratch folder holds this run
        trainer = build_trainer(run_cfg)
        for checkpoint in checkpoints:
            trainer.resume(checkpoint)
            with trainer.ema_weights():
                yield {"step": trainer.step, **trainer.task.evaluate()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--metrics", nargs="*", default=[], help="metrics added to the run's own (e.g. fd_t2i_mlp)")
    parser.add_argument("--every", type=int, default=1, help="judge checkpoints whose step is a multiple of this, "
                        "and the last")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        if not (args.run / RUN_CONFIG).is_file():
            raise UserInputError(f"{args.run} is not a onestep run folder (no {RUN_CONFIG})")
        cfg = config_from(read_json(args.run / RUN_CONFIG), label=str(args.run / RUN_CONFIG))
        found = complete_checkpoints(args.run / "checkpoints")
        if not found:
            raise UserInputError(f"{args.run} has no complete checkpoint")
        chosen = [c for c in found if read_state(c)["step"] % args.every == 0 or c == found[-1]]
        history = []
        for judged in judge_checkpoints(cfg, chosen, args.metrics):
            record = {k: v for k, v in judged.items() if k != "protocol"}
            history.append(record)
            print(json.dumps(record), flush=True)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        write_json_atomic(args.out, {"config": to_dict(cfg), "history": history})
    return 0


if __name__ == "__main__":
    sys.exit(main())
