"""`onestep train | sample | fid | export | bench`: thin commands over the Python API.

Bad input (a missing path, a typo'd config key, a wrong type, an impossible value, mismatched shapes) ends with
exit code 2 and one line on stderr; nothing already on disk is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


DIGITS_TEACHER_STEPS = [1, 4, 10, 50]  # `onestep bench`'s teacher rows (digits-t2i runs: 4, 10, 25 unless given)


def _train(args: argparse.Namespace) -> int:
    from onestep.config import load_config
    from onestep.runs import is_main_process, train

    overrides = args.overrides
    if args.tiny:  # a tiny random folder's teacher, data and settings first; the command line's overrides win
        from onestep.tiny import tiny_overrides

        overrides = [*tiny_overrides(args.tiny, args.config), *overrides]
    cfg = load_config(args.config, overrides)
    _quiet_loading()  # a text teacher's "Loading weights" bar would stand between a bad input and its one line
    final = train(cfg, overwrite=args.overwrite)
    if is_main_process():  # one result line, however many processes trained
        print(json.dumps({"output_dir": cfg.output_dir, **final}))
        if "interrupted" in final:
            print(f"onestep train: {stopped_line(final, args)}", file=sys.stderr)
    return 0


def stopped_line(final: dict, args: argparse.Namespace) -> str:
    """Where a run stopped by a signal left its checkpoint and export, and the command that resumes it."""
    import shlex

    exported = (f"pipeline {final['pipeline']}" if "pipeline" in final
                else f"no export ({final.get('export_skipped', 'skipped')})")
    resume = shlex.join(["onestep", "train", args.config, *args.overrides])
    return (f"stopped by {final['interrupted']} at step {final['step']}: checkpoint {final['checkpoint']}, "
            f"{exported}; resume with: {resume}")


def _quiet_loading() -> None:
    """No "Loading weights" / "Loading pipeline components" bars: sample and fid print one JSON line (or one error)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _requests(sampler, n: int, prompts_file: str | None):
    """Balanced class labels (class-conditional) or the prompt file's prompts cycled over n (text-to-image)."""
    from onestep.eval.sampling import balanced_labels

    prompts = None
    if prompts_file is not None:
        from onestep.data.prompts import read_prompts
        from onestep.eval.judge import cycle

        prompts = cycle(read_prompts(Path(prompts_file)), n)
    sampler.check_prompts(prompts)
    return (balanced_labels(n, sampler.num_classes) if sampler.num_classes else None), prompts


def _sample(args: argparse.Namespace) -> int:
    from onestep.errors import UserInputError

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise UserInputError(f"--out must end in .png (grid) or .npz (arrays), got {out.name}")
    import numpy as np

    from onestep.eval.grid import save_grid
    from onestep.eval.quantize import to_uint8
    from onestep.sampling.inference import load_sampler

    _quiet_loading()
    sampler = load_sampler(args.folder, args.steps, args.sampler, args.guidance)
    labels, prompts = _requests(sampler, args.num_images, args.prompts)
    images = to_uint8(sampler.sample(labels, args.num_images, args.seed, prompts=prompts))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        save_grid(images, out, labels=prompts)  # each image's prompt written under it
    else:
        from onestep.files import atomic_file

        arrays = {"images": images.permute(0, 2, 3, 1).numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        if prompts is not None:
            arrays["prompts"] = np.array(prompts, dtype=np.str_)
        with atomic_file(out) as f:
            np.savez(f, **arrays)
    print(json.dumps({"out": str(out), "num_images": args.num_images, "nfe": sampler.nfe}))
    return 0


def _npz_images(source: Path, limit: int | None):
    """uint8 (N, C, H, W) images (and prompts, when stored) of a SAMPLES.npz written by `onestep sample`."""
    import numpy as np
    import torch

    from onestep.errors import UserInputError

    if not source.is_file():
        raise UserInputError(f"samples file not found: {source}")
    try:
        with np.load(source, allow_pickle=False) as data:
            if "images" not in data:
                raise UserInputError(f"{source} has no 'images' array (N, H, W, C uint8)")
            images = torch.from_numpy(data["images"])
            prompts = [str(p) for p in data["prompts"]] if "prompts" in data else None
    except (OSError, ValueError, EOFError) as err:
        raise UserInputError(f"cannot read samples {source}: {str(err).splitlines()[0]}") from None
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise UserInputError(f"{source} images must be uint8 (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
    images = images.permute(0, 3, 1, 2)
    return (images[:limit], prompts[:limit] if prompts else None) if limit else (images, prompts)


def _fid(args: argparse.Namespace) -> int:
    from onestep.errors import UserInputError

    no_fd = args.features == "none"
    if no_fd and (args.save_stats or not args.metrics):
        raise UserInputError("--features none scores --metrics only (give at least one; no --save-stats)")
    if args.source is None and not args.save_stats:
        raise UserInputError("give a SOURCE to score, or --save-stats OUT.npz to write the reference's statistics")
    from onestep.eval.features import FeatureOptions
    from onestep.eval.metrics import FrechetMetric, MetricContext, build_metric, run_metrics

    _quiet_loading()
    options = FeatureOptions(args.inception_weights, args.allow_pickle)
    ctx = MetricContext(batch_size=args.batch_size, features=options, clip_model=args.clip_model)
    if args.source is None:
        _save_reference_stats(args, options)
        return 0
    fd = None if no_fd else FrechetMetric(args.features, args.reference, ctx)
    protocol = {"seed": None, "source": args.source}
    if args.save_stats:
        _save_reference_stats(args, options, fd.fd.stats)
        protocol["stats"] = args.save_stats
    metrics = ([fd] if fd else []) + [build_metric(name, ctx) for name in args.metrics]
    batches, sampler = _fid_batches(args, protocol)
    values, protocols = run_metrics(metrics, _remember_size(batches, protocol))
    result = {"value": values[fd.key], "protocol": {**protocols[fd.key], **protocol}} if fd else {"protocol": protocol}
    result.update({key: {"value": values[key], "protocol": protocols[key]} for key in values if fd is None
                   or key != fd.key})
    if args.forget:
        from onestep.bench.compare import forgetting_metrics
        from onestep.eval.classifier import DIGITS_JUDGES

        judge = args.features if args.features in DIGITS_JUDGES else "digits"  # whose classifier counts
        result["forgetting"] = forgetting_metrics(sampler, args.forget, args.num_samples or 1000, args.seed,
                                                  (judge,))[judge]
    print(json.dumps(result))
    return 0


def _fid_batches(args: argparse.Namespace, protocol: dict):
    """(SampleBatches of the SOURCE, the folder sampler or None): an .npz, an image folder, or samples drawn from a
    pipeline / teacher folder (whose seed, NFE and requests go into `protocol`)."""
    from onestep.errors import UserInputError
    from onestep.eval.features import FEATURES
    from onestep.eval.metrics import SampleBatch
    from onestep.eval.quantize import to_uint8

    source = Path(args.source)
    folder = source.is_dir() and not (source / "model_index.json").exists()
    if (source.suffix == ".npz" or folder) and (args.forget or args.prompts):
        raise UserInputError("--forget and --prompts need a pipeline or teacher folder to sample from, "
                             f"not {'an image folder' if folder else 'an .npz'}")
    if source.suffix == ".npz":
        images, prompts = _npz_images(source, args.num_samples)
        return (SampleBatch(images[i:i + args.batch_size], None, prompts[i:i + args.batch_size] if prompts else None)
                for i in range(0, len(images), args.batch_size)), None
    if folder:
        from onestep.eval.image_files import iter_image_batches

        channels = FEATURES[args.features].channels if args.features in FEATURES else 3
        return (SampleBatch(b) for b in iter_image_batches(source, channels, args.batch_size)), None
    from onestep.sampling.inference import load_sampler

    sampler = load_sampler(source, args.steps, args.sampler, args.guidance)
    _check_features(sampler, args.features)
    n = args.num_samples or 1000
    labels, prompts = _requests(sampler, n, args.prompts)
    protocol.update(seed=args.seed, nfe=sampler.nfe, requests=f"prompts from {args.prompts}, cycled" if prompts
                    else ("class-balanced labels" if labels is not None else "unconditional"))
    return (SampleBatch(to_uint8(images), lab, pr)
            for images, lab, pr in sampler.batches(labels, n, args.seed, args.batch_size, prompts)), sampler


def _check_features(sampler, features: str) -> None:
    """Before sampling: the digits judges score 8x8 grey digits, never a text-to-image folder's images."""
    from onestep.errors import UserInputError
    from onestep.eval.classifier import DIGITS_JUDGES

    if sampler.is_text and features in DIGITS_JUDGES:
        raise UserInputError(f"{sampler.path} is text-to-image and --features {features} judges 8x8 grey digits: "
                             "pass --features inception (FID, with --inception-weights), t2i (digits-t2i students) "
                             "or none (with --metrics)")


def _remember_size(batches, protocol: dict):
    """Pass SampleBatches through, recording the generated images' size (C x H x W) in `protocol`."""
    for batch in batches:
        protocol.setdefault("image_size", list(batch.images.shape[1:]))
        yield batch


def _save_reference_stats(args: argparse.Namespace, options, stats=None) -> None:
    """Write the reference's statistics (computed, or read from the cache) to --save-stats."""
    from onestep.eval.fd import FrechetDistance, save_stats

    if stats is None:
        fd = FrechetDistance(args.features, args.reference, options, batch_size=args.batch_size)
        stats = fd.stats
        print(json.dumps({"stats": args.save_stats, "num_reference": stats.num_samples or None,
                          "protocol": fd.base_protocol}))
    stats.features = stats.features or args.features
    save_stats(stats, args.save_stats)


def _export(args: argparse.Namespace) -> int:
    from onestep.export.stock import stock_folder
    from onestep.runs import export_run

    _quiet_loading()
    pipeline = export_run(Path(args.run_dir), Path(args.out) if args.out else None, args.step)
    stock = stock_folder(pipeline)  # an SD-family one-step student is also exported as a stock diffusers folder
    print(json.dumps({"pipeline": str(pipeline), **({"diffusers": str(stock)} if stock.is_dir() else {})}))
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from onestep.tiny import write_tiny

    _quiet_loading()
    print(json.dumps(write_tiny(args.kind, args.out)))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from onestep.errors import UserInputError

    if args.suite == "attention":
        from onestep.bench.attention import run_attention_suite

        run_attention_suite(Path(args.out))
        return 0
    if args.shape:
        from onestep.bench.memory import check_shape

        check_shape(args.shape)
    if args.suite == "memory" and args.shape:
        from onestep.bench.memory import METHODS, SHAPE_VARIANTS, markdown, run_shape_suite, shape_methods

        unknown = sorted(set(args.methods or []) - set(METHODS))
        unknown += sorted(set(args.variants or []) - set(SHAPE_VARIANTS))
        if unknown:
            raise UserInputError(f"unknown method or variant {unknown[0]!r}; methods: {', '.join(METHODS)}; "
                                 f"variants: {', '.join(SHAPE_VARIANTS)}")
        report = run_shape_suite(args.shape, Path(args.out), list(args.methods or shape_methods(args.shape)),
                                 list(args.variants or SHAPE_VARIANTS), args.steps, args.latent_size, args.max_gb,
                                 reference=Path(args.reference) if args.reference else None)
        (Path(args.out) / "memory.md").write_text(markdown(report))
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
    if args.suite == "modes":
        from onestep.bench.modes import run_modes_suite

        run_modes_suite([Path(r) for r in args.runs], Path(args.out), args.num_samples or 10000,
                        max(args.teacher_steps), args.seeds, args.mode_set)
        return 0
    if args.suite == "compare":
        from onestep.bench.t2i_teacher import T2I_STEPS, is_t2i_run, run_t2i_benchmark

        if is_t2i_run(Path(args.runs[0])):  # students of builtin:digits-t2i: the t2i table, both t2i judges
            steps = args.teacher_steps if args.teacher_steps != DIGITS_TEACHER_STEPS else list(T2I_STEPS)
            run_t2i_benchmark([Path(r) for r in args.runs], Path(args.out), steps, not args.no_cache)
            return 0
    from onestep.bench.compare import run_benchmark, step_overhead
    from onestep.config import load_config

    if args.suite == "step-overhead":
        for config in args.runs:
            overrides = []
            if args.shape:  # real-size random-weight networks, batch 1, the savers of the first --variants entry
                from onestep.bench.memory import ESTIMATED_FROM, SHAPE_VARIANTS, shape_overrides

                if args.shape in ESTIMATED_FROM:
                    raise UserInputError(f"--shape {args.shape} is never built here: its memory rows are estimated "
                                         f"from {ESTIMATED_FROM[args.shape]}'s")

                method = load_config(config, [f"output_dir={args.out}"]).method
                overrides = [*shape_overrides(args.shape, method, Path(args.out), args.latent_size),
                             *SHAPE_VARIANTS[(args.variants or ["bf16_ckpt_lora"])[0]]]
            cfg = load_config(config, [f"output_dir={args.out}", *overrides, *args.overrides])
            print(json.dumps({"config": config, **step_overhead(cfg, args.iterations)}))
        return 0
    run_benchmark([Path(r) for r in args.runs], Path(args.out), num_samples=args.num_samples or 1000,
                  teacher_steps=args.teacher_steps, speed_batch=args.speed_batch, seeds=args.seeds,
                  forget=args.forget, use_cache=not args.no_cache)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onestep", description="Distill diffusers UNets into one-step generators.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a method from a YAML config (resumes automatically)",
                           epilog="Every config key, its default and meaning: docs/config.md "
                                  "(python -m onestep.config_reference).")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    train.add_argument("--overwrite", action="store_true",
                       help="start over in an output_dir that holds another run: what it holds is moved aside to "
                            "OUTPUT_DIR.replaced-DATE-TIME (never deleted)")
    train.add_argument("--tiny", default=None, metavar="FOLDER",
                       help="run the recipe for 2 steps on a folder written by `onestep tiny` (its teacher and data, "
                            "eval off, output in FOLDER/runs/)")
    train.set_defaults(run=_train)

    def sampling_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--prompts", default=None,
                       help="text-to-image folders: a prompt file (one per line), cycled over the images")
        p.add_argument("--steps", type=int, default=50, help="teacher folders: sampler steps")
        p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="teacher folders: sampler")
        p.add_argument("--guidance", type=float, default=None, help="teacher folders: guidance scale")

    sample = sub.add_parser("sample", help="write a PNG grid or an .npz of samples")
    sample.add_argument("folder", help="exported pipeline folder or teacher folder")
    sample.add_argument("--num-images", type=int, default=100)
    sample.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npz (images, labels)")
    sampling_args(sample)
    sample.set_defaults(run=_sample)

    fid = sub.add_parser("fid", help="Fréchet distance (+ metrics) of a pipeline's samples, an .npz or an image "
                                     "folder; prints JSON with the protocol")
    fid.add_argument("source", nargs="?", default=None,
                     help="PIPELINE_DIR, teacher folder, SAMPLES.npz or IMAGE_DIR (omit with --save-stats)")
    fid.add_argument("--reference", default="digits",
                     help="digits | STATS.npz (ours, pytorch-fid or clean-fid {mu, sigma}) | IMAGE_DIR")
    fid.add_argument("--features", default="digits",
                     help="digits | digits_mlp (the second digits judge) | inception | a registered feature network "
                          "| none (--metrics only)")
    fid.add_argument("--inception-weights", default=None,
                     help="FID Inception weights (.safetensors; a .pth needs --allow-pickle)")
    fid.add_argument("--allow-pickle", action="store_true", help="allow reading pickled (.pth) Inception weights")
    fid.add_argument("--save-stats", default=None, help="also write the reference's statistics to OUT.npz")
    fid.add_argument("--metrics", nargs="+", default=[], help="further metrics, e.g. clip_score")
    fid.add_argument("--clip-model", default=None, help="clip_score: a local CLIP model folder")
    fid.add_argument("--batch-size", type=int, default=250, help="images per feature-network call")
    fid.add_argument("--num-samples", type=int, default=None)
    fid.add_argument("--forget", type=int, nargs="+", default=[],
                     help="forgotten classes: add unlearning accuracy (the --features judge's classifier, digits "
                          "unless digits_mlp) and FD on the remaining classes")
    sampling_args(fid)
    fid.set_defaults(run=_fid)

    export = sub.add_parser("export", help="export the pipeline of a run from its newest checkpoint")
    export.add_argument("run_dir")
    export.add_argument("--step", type=int, default=None, help="export the kept checkpoint of this step instead "
                        "(train.keep_checkpoints keeps several)")
    export.add_argument("--out", default=None, help="default: RUN_DIR/pipeline, with --step RUN_DIR/pipeline-STEP")
    export.set_defaults(run=_export)

    tiny = sub.add_parser("tiny", help="write a tiny random diffusers folder of a layout, to try recipes on")
    tiny.add_argument("kind", choices=["sd15", "sdxl", "sd3", "flux"])
    tiny.add_argument("out", help="a new folder")
    tiny.set_defaults(run=_tiny)

    bench = sub.add_parser("bench", help="teacher vs students: FD, NFE, images/s; Markdown table + PNG chart")
    bench.add_argument("runs", nargs="*",
                       help="run output folders (step-overhead, scaling, memory: config files; attention: none)")
    bench.add_argument("--suite", default="compare",
                       choices=["compare", "step-overhead", "convergence", "attention", "scaling", "memory", "modes"],
                       help="compare: teacher vs students; step-overhead: iteration time vs its network passes; "
                            "convergence: FD-vs-step over seeds, steps to reach the baseline's final FD; "
                            "attention: forward+backward time per attention backend; scaling: training samples/s of "
                            "1 vs N processes; memory: peak memory of training steps per memory saver; modes: mode "
                            "and sub-mode coverage of students of a configs/modes teacher against it")
    bench.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="scaling: process counts")
    bench.add_argument("--train-steps", type=int, default=30, help="scaling: training steps per process count")
    bench.add_argument("--batch-size", type=int, default=None, help="memory: data.batch_size (default: the config's)")
    bench.add_argument("--shape", default=None,
                       help="memory: real-size random-weight models (sd15, sdxl, sd35m; flux: estimated from sd35m; "
                            "tiny, tiny_sd3, tiny_flux) in their configs/ recipes at batch 1")
    bench.add_argument("--reference", default=None,
                       help="memory --shape flux: the sd35m memory.json its rows are estimated from (default: "
                            "measure sd35m first)")
    bench.add_argument("--methods", nargs="+", default=None,
                       help="memory --shape: methods (default: those with a recipe for the shape)")
    bench.add_argument("--variants", nargs="+", default=None, help="memory --shape: variants (default: all)")
    bench.add_argument("--steps", type=int, default=2, help="memory --shape: rounds of every update (first: warm-up)")
    bench.add_argument("--latent-size", type=int, default=None,
                       help="memory --shape: a reduced latent side (activations are scaled by the area ratio)")
    bench.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                       help="step-overhead: config overrides")
    bench.add_argument("--max-gb", type=float, default=14.0, help="memory --shape: never run a variant above this")
    bench.add_argument("--baseline", default="dmd2", help="convergence: the method whose final FD is the target")
    bench.add_argument("--iterations", type=int, default=20, help="step-overhead: timed TTUR periods")
    bench.add_argument("--out", required=True)
    bench.add_argument("--num-samples", type=int, default=None,
                       help="samples per noise seed (default: compare 1000, modes 10000)")
    bench.add_argument("--teacher-steps", type=int, nargs="+", default=DIGITS_TEACHER_STEPS,
                       help="teacher DDIM steps (modes: the largest is the reference; digits-t2i runs: 4 10 25 "
                            "unless given)")
    bench.add_argument("--speed-batch", type=int, default=256)
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="noise seeds of the FD samples")
    bench.add_argument("--forget", type=int, nargs="+", default=[],
                       help="forgotten classes: add unlearning accuracy and FD on the remaining classes per row")
    bench.add_argument("--mode-set", default="squares",
                       help="modes: the mode set the teacher was trained on (scripts/make_modes_data.py --mode-set)")
    bench.add_argument("--no-cache", action="store_true",
                       help="compare: resample the teacher's rows instead of reading the teacher-row cache")
    bench.set_defaults(run=_bench)
    return parser


def _parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parse_args`, except that `train`'s key=value overrides may also follow its options (`train CONFIG
    --overwrite a=1`): argparse fills a `*` positional once, so overrides after an option come back unknown."""
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command == "train" and all("=" in u and not u.startswith("-") for u in unknown):
        args.overrides = [*args.overrides, *unknown]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from onestep.errors import PeerLost, UserInputError

    args = _parse_args(build_parser(), argv)
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
    except PeerLost as err:  # another process of a multi-process run died; this one stopped, nothing half-written
        print(f"onestep {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    except FloatingPointError as err:  # the trainer stopped on non-finite updates; its last checkpoint is intact
        print(f"onestep {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C outside training, or a second stop signal (StoppedAtOnce)
        print(f"onestep {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
