"""Does the data path's memory grow with the dataset? Peak RSS and steps/s of a short run on N captioned images.

Writes a synthetic captioned imagefolder (64x64 PNGs + metadata.jsonl) of each size, a tiny SD1.5-shaped teacher
working at 64x64 (the test suite's random components), then trains `dmd2` with the GAN term (each critic step reads
a batch of real images with their captions) for --steps steps in a child process, sampling every 50 ms the peak RSS of
the training process and the PSS of it and its DataLoader workers (summed).

    OMP_NUM_THREADS=1 python scripts/data_memory_bench.py --out /work/runs/bench --sizes 2000 20000 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil


ROOT = Path(__file__).resolve().parents[1]


def write_folder(path: Path, n: int) -> None:
    """n smooth random 64x64 RGB images (PNG) with two-word captions; kept when already complete."""
    from PIL import Image

    if (path / "metadata.jsonl").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "a cat", "a dog"]
    with open(path / "metadata.jsonl.tmp", "w") as f:
        for i in range(n):
            low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(low).resize((64, 64), Image.BILINEAR).save(path / f"{i:06d}.png")
            f.write(json.dumps({"file_name": f"{i:06d}.png", "text": f"{words[i % 4]} {words[(i // 4) % 4]}"}) + "\n")
    (path / "metadata.jsonl.tmp").rename(path / "metadata.jsonl")


def write_teacher(path: Path) -> None:
    """The test suite's tiny CLIP and UNet (8x8 latents) with a 4-level VAE (downsampling 8): a 64x64 teacher."""
    if (path / "model_index.json").is_file():
        return
    sys.path.insert(0, str(ROOT))
    from diffusers import AutoencoderKL

    from tests.conftest import save_folder, scheduler, tiny_clip, tiny_text_unet

    path.mkdir(parents=True, exist_ok=True)
    encoder, tokenizer = tiny_clip(path)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                        layers_per_block=1, sample_size=64)
    save_folder(path, "StableDiffusionPipeline", unet=tiny_text_unet(size=8), vae=vae,
                scheduler=scheduler("epsilon", zero_snr=False), text_encoder=encoder, tokenizer=tokenizer)


def run(out: Path, folder: Path, teacher: Path, steps: int, workers: int, batch: int, cache: bool) -> dict:
    """One training run in a child process: its peak RSS (with workers) and its steps/s after the first step."""
    run_dir = out / f"run-{folder.name}{'-cache' if cache else ''}"
    config = {"method": "dmd2", "output_dir": str(run_dir), "teacher": {"path": str(teacher)},
              "data": {"name": "image_folder", "image_dir": str(folder), "batch_size": batch, "num_workers": workers,
                       "latent_cache": str(run_dir / "latents") if cache else None},
              "train": {"max_steps": steps, "mixed_precision": "no", "log_every": 1, "checkpoint_every": 0},
              "eval": {"num_samples": 4, "sampling_batch": 4, "features": "none"},
              "options": {"generator_timesteps": [999], "generator_every": 5, "gan": True}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.yaml").write_text(json.dumps(config))
    args = [sys.executable, "-m", "onestep.cli", "train", str(out / "bench.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(out / "hf_cache"), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    shutil.rmtree(run_dir, ignore_errors=True)  # its own scratch run (`--overwrite` would keep the old one aside)
    run_dir.mkdir(parents=True)
    stderr = open(out / f"{run_dir.name}.stderr", "w")  # a file, not a pipe: progress bars would fill a pipe and block
    child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    proc, peak_pss, peak_main = psutil.Process(child.pid), 0, 0
    while child.poll() is None:
        try:  # PSS: pages the forked workers share with the main process count once, not once per process
            tree = [proc, *proc.children(recursive=True)]
            peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in tree))
            peak_main = max(peak_main, proc.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    stderr.close()
    if child.returncode != 0:
        raise SystemExit(f"run failed ({child.returncode}): {(out / f'{run_dir.name}.stderr').read_text()[-2000:]}")
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    timed = [r for r in log if "elapsed_s" in r and "event" not in r]
    rate = (timed[-1]["step"] - timed[0]["step"]) / (timed[-1]["elapsed_s"] - timed[0]["elapsed_s"])
    return {"images": int(folder.name.split("-")[-1]), "latent_cache": cache,
            "peak_pss_mib": round(peak_pss / 2**20, 1), "peak_rss_main_mib": round(peak_main / 2**20, 1),
            "steps_per_s": round(rate, 3), "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="runs per size, interleaved (the machine is shared)")
    parser.add_argument("--cache", action="store_true", help="also train from a latent cache")
    args = parser.parse_args()
    teacher = args.out / "teacher"
    write_teacher(teacher)
    folders = [args.out / f"images-{n}" for n in args.sizes]
    for folder, n in zip(folders, args.sizes, strict=True):
        write_folder(folder, n)
    results = []
    for _ in range(args.repeats):
        for folder in folders:
            for cache in (False, True) if args.cache else (False,):
                results.append(run(args.out, folder, teacher, args.steps, args.workers, args.batch, cache))
                print(json.dumps(results[-1]), flush=True)
    summary: dict[str, list[dict]] = {}
    for r in results:
        summary.setdefault(f"{r['images']}{' cache' if r['latent_cache'] else ''}", []).append(r)
    for key, runs in summary.items():
        print(f"{key:>12} images: peak PSS (process + workers) {max(r['peak_pss_mib'] for r in runs):.0f} MiB, "
              f"peak RSS (training process) {max(r['peak_rss_main_mib'] for r in runs):.0f} MiB, steps/s "
              f"{np.median([r['steps_per_s'] for r in runs]):.3f} (median of {len(runs)}: "
              f"{[r['steps_per_s'] for r in runs]})")

if __name__ == "__main__":
    main()
