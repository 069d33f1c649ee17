"""`onestep train | sample | fid | export | bench`: thin commands over the Python API; bad input exits with 2."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from onestep.config import load_config
    from onestep.runs import build_trainer

    cfg = load_config(args.config, args.overrides)
    trainer = build_trainer(cfg)
    final = trainer.train()
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onestep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a method from a YAML config (resumes automatically)")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    train.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from onestep.errors import UserInputError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserInputError as err:
        print(f"onestep {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
