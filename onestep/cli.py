"""`onestep train | sample | fid | export | bench`: thin commands over the Python API.

Bad input (a missing path, a typo'd config key, a wrong type, an impossible value, mismatched shapes) ends with
exit code 2 and one line on stderr; nothing already on disk is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from onestep.config import load_config
    from onestep.runs import is_main_process, train

    cfg = load_config(args.config, args.overrides)
    final = train(cfg, overwrite=args.overwrite)
    if is_main_process():  # one result line, however many processes trained
        print(json.dumps({"output_dir": cfg.output_dir, **final}))
    return 130 if "interrupted" in final else 0


def _balanced(num_classes: int | None, n: int):
    from onestep.eval.sampling import balanced_labels

    return balanced_labels(n, num_classes) if num_classes else None


def _sample(args: argparse.Namespace) -> int:
    import numpy as np

    from onestep.errors import UserInputError
    from onestep.eval.grid import save_grid
    from onestep.eval.quantize import to_uint8
    from onestep.inference import load_sampler

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise UserInputError(f"--out must end in .png (grid) or .npz (arrays), got {out.name}")
    sampler = load_sampler(args.folder, args.steps, args.sampler, args.guidance)
    labels = _balanced(sampler.num_classes, args.num_images)
    images = to_uint8(sampler.sample(labels, args.num_images, args.seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        save_grid(images, out)
    else:
        from onestep.files import atomic_file

        arrays = {"images": images.permute(0, 2, 3, 1).numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        with atomic_file(out) as f:
            np.savez(f, **arrays)
    print(json.dumps({"out": str(out), "num_images": args.num_images, "nfe": sampler.nfe}))
    return 0


def _fid(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from onestep.errors import UserInputError
    from onestep.eval.fd import frechet_distance
    from onestep.eval.quantize import to_uint8
    from onestep.inference import load_sampler

    source = Path(args.source)
    if source.suffix == ".npz":
        if not source.is_file():
            raise UserInputError(f"samples file not found: {source}")
        with np.load(source) as data:
            if "images" not in data:
                raise UserInputError(f"{source} has no 'images' array (N, H, W, C uint8)")
            images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2)
        if images.dtype != torch.uint8:
            raise UserInputError(f"{source} images must be uint8, got {images.dtype}")
        images = images[: args.num_samples] if args.num_samples else images
        if args.forget:
            raise UserInputError("--forget needs a pipeline or teacher folder to sample from, not an .npz")
    else:
        sampler = load_sampler(source, args.steps, args.sampler, args.guidance)
        n = args.num_samples or 1000
        images = to_uint8(sampler.sample(_balanced(sampler.num_classes, n), n, args.seed))
    result = frechet_distance(images, reference=args.reference, features=args.features).to_dict()
    if args.forget:
        from onestep.bench.compare import forgetting_metrics

        result["forgetting"] = forgetting_metrics(sampler, args.forget, n, args.seed)
    print(json.dumps(result))
    return 0


def _export(args: argparse.Namespace) -> int:
    from onestep.runs import export_run

    print(json.dumps({"pipeline": str(export_run(Path(args.run_dir), Path(args.out) if args.out else None))}))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from onestep.bench.compare import run_benchmark, step_overhead
    from onestep.config import load_config
    from onestep.errors import UserInputError

    if args.suite == "attention":
        from onestep.bench.attention import run_attention_suite

        run_attention_suite(Path(args.out))
        return 0
    if not args.runs:
        raise UserInputError(f"suite {args.suite} needs at least one run folder or config file")
    if args.suite == "scaling":
        from onestep.bench.scaling import run_scaling_suite

        run_scaling_suite(Path(args.runs[0]), Path(args.out), args.processes, args.train_steps)
        return 0
    if args.suite == "memory":
        from onestep.bench.memory import run_memory_suite

        run_memory_suite(Path(args.runs[0]), Path(args.out), args.batch_size)
        return 0
    if args.suite == "convergence":
        from onestep.bench.convergence import run_convergence

        run_convergence([Path(r) for r in args.runs], Path(args.out), args.baseline)
        return 0
    if args.suite == "step-overhead":
        for config in args.runs:
            cfg = load_config(config, [f"output_dir={args.out}"])
            print(json.dumps({"config": config, **step_overhead(cfg, args.iterations)}))
        return 0
    run_benchmark([Path(r) for r in args.runs], Path(args.out), num_samples=args.num_samples,
                  teacher_steps=args.teacher_steps, speed_batch=args.speed_batch, seeds=args.seeds,
                  forget=args.forget)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onestep", description="Distill diffusers UNets into one-step generators.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a method from a YAML config (resumes automatically)")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    train.add_argument("--overwrite", action="store_true",
                       help="start over in an output_dir that holds another run (removes its checkpoints)")
    train.set_defaults(run=_train)

    def sampling_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--steps", type=int, default=50, help="teacher folders: sampler steps")
        p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="teacher folders: sampler")
        p.add_argument("--guidance", type=float, default=None, help="teacher folders: guidance scale")

    sample = sub.add_parser("sample", help="write a PNG grid or an .npz of samples")
    sample.add_argument("folder", help="exported pipeline folder or teacher folder")
    sample.add_argument("--num-images", type=int, default=100)
    sample.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npz (images, labels)")
    sampling_args(sample)
    sample.set_defaults(run=_sample)

    fid = sub.add_parser("fid", help="Fréchet distance of a pipeline's samples or an .npz; prints JSON")
    fid.add_argument("source", help="PIPELINE_DIR, teacher folder or SAMPLES.npz")
    fid.add_argument("--reference", default="digits", help="digits | STATS.npz | IMAGE_DIR")
    fid.add_argument("--features", default="digits", choices=["digits", "inception"])
    fid.add_argument("--num-samples", type=int, default=None)
    fid.add_argument("--forget", type=int, nargs="+", default=[],
                     help="forgotten classes: add unlearning accuracy and FD on the remaining classes")
    sampling_args(fid)
    fid.set_defaults(run=_fid)

    export = sub.add_parser("export", help="export the pipeline of a run from its newest checkpoint")
    export.add_argument("run_dir")
    export.add_argument("--out", default=None, help="default: RUN_DIR/pipeline")
    export.set_defaults(run=_export)

    bench = sub.add_parser("bench", help="teacher vs students: FD, NFE, images/s; Markdown table + PNG chart")
    bench.add_argument("runs", nargs="*",
                       help="run output folders (step-overhead, scaling, memory: config files; attention: none)")
    bench.add_argument("--suite", default="compare",
                       choices=["compare", "step-overhead", "convergence", "attention", "scaling", "memory"],
                       help="compare: teacher vs students; step-overhead: iteration time vs its network passes; "
                            "convergence: FD-vs-step over seeds, steps to reach the baseline's final FD; "
                            "attention: forward+backward time per attention backend; scaling: training samples/s of "
                            "1 vs N processes; memory: peak memory of training steps per memory saver")
    bench.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="scaling: process counts")
    bench.add_argument("--train-steps", type=int, default=30, help="scaling: training steps per process count")
    bench.add_argument("--batch-size", type=int, default=None, help="memory: data.batch_size (default: the config's)")
    bench.add_argument("--baseline", default="dmd2", help="convergence: the method whose final FD is the target")
    bench.add_argument("--iterations", type=int, default=20, help="step-overhead: timed TTUR periods")
    bench.add_argument("--out", required=True)
    bench.add_argument("--num-samples", type=int, default=1000)
    bench.add_argument("--teacher-steps", type=int, nargs="+", default=[1, 4, 10, 50])
    bench.add_argument("--speed-batch", type=int, default=256)
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="noise seeds of the FD samples")
    bench.add_argument("--forget", type=int, nargs="+", default=[],
                       help="forgotten classes: add unlearning accuracy and FD on the remaining classes per row")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from onestep.errors import UserInputError

    args = build_parser().parse_args(argv)
    for name in ("num_images", "num_samples", "steps", "speed_batch", "train_steps", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            print(f"onestep {args.command}: error: --{name.replace('_', '-')} must be > 0, got {value}",
                  file=sys.stderr)
            return 2
    try:
        return args.run(args)
    except UserInputError as err:
        print(f"onestep {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # the trainer stopped on non-finite updates; its last checkpoint is intact
        print(f"onestep {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"onestep {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
