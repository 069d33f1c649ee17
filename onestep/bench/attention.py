"""`onestep bench --suite attention`: training-step time (forward + backward) of an attention-heavy UNet per
attention backend, so that the choice `auto` makes can be checked on each machine with one command."""

from __future__ import annotations

import json
import platform
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from diffusers import UNet2DModel

from onestep.models.attention import set_attention_backend, xformers_available


SIZE, BATCH, WARMUP, REPEATS = 32, 8, 2, 5  # fixed, so that numbers from different machines compare


def attention_unet() -> UNet2DModel:
    """Attention in every block, at 32x32 and 16x16 (1024 and 256 tokens per image): the cost the backends differ
    in is a large share of the step, unlike in the 8x8 digits teacher."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), norm_num_groups=8, attention_head_dim=8)


def time_backend(model: UNet2DModel, backend: str, precision: str) -> dict:
    """Median seconds of one forward + backward at batch BATCH after WARMUP untimed steps (and the peak memory of
    the timed steps on CUDA)."""
    device = next(model.parameters()).device
    set_attention_backend(model, backend)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator).to(device)
    t = torch.randint(0, 1000, (BATCH,), generator=generator).to(device)
    cuda = device.type == "cuda"

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, t).sample
        out.float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()

    for _ in range(WARMUP):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    row = {"backend": backend, "precision": precision, "seconds_per_iteration": statistics.median(times)}
    if cuda:
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def xformers_version() -> str | None:
    """The installed xformers (None when absent): its builds differ in kernels, so a timing needs its version."""
    try:
        return version("xformers")
    except PackageNotFoundError:
        return None


def run_attention_suite(out: Path) -> dict:
    """Time sdpa and eager (and xformers where usable) in fp32 (and bf16 autocast on CUDA, where SDPA's flash kernel
    applies); print the report as one JSON line and write it to OUT/attention.json."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = attention_unet().to(device)
    backends = ["sdpa", "eager"] + (["xformers"] if xformers_available(device.type) else [])
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    rows = [time_backend(model, b, p) for p in precisions for b in backends]
    seconds = {(r["backend"], r["precision"]): r["seconds_per_iteration"] for r in rows}
    report = {"suite": "attention", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"cpu ({platform.machine()})", "torch": torch.__version__,
              "xformers": xformers_version(), "threads": torch.get_num_threads(),
              "model": f"UNet2DModel {SIZE}x{SIZE}, channels (32, 64), attention in all blocks, head dim 8",
              "batch": BATCH, "warmup": WARMUP, "repeats": REPEATS, "rows": rows}
    for backend in backends[1:]:
        report[f"{backend}_over_sdpa"] = {p: seconds[backend, p] / seconds["sdpa", p] for p in precisions}
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return report
