"""Equivalence of the memory savers at real shape (a benchmark, not a CI test: minutes of CPU).

On an SD1.5-shaped UNet (random weights, published config; `onestep.models.shapes`) at batch 1 with a 77-token text
condition, it checks and prints as one JSON line:
  - gradient checkpointing (`onestep.models.unet.enable_gradient_checkpointing`) gives the same loss and gradients;
  - a LoRA UNet with trained (random, non-zero) adapters equals the merged plain UNet that export writes
    (`onestep.models.lora.without_adapters(merge=True)`), and the adapter file route (`save_lora_weights` +
    `load_lora_weights` onto the base);
  - a bf16 teacher's x0-prediction against the float32 one (relative L2 error, stated, not asserted).

    OMP_NUM_THREADS=1 python scripts/benchmarks/equivalence.py --latent-size 32
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from onestep.models.conditioning import Condition
from onestep.models.lora import LoRAConfig, add_lora, load_lora_weights, save_lora_weights, without_adapters
from onestep.models.schedules import VPSchedule
from onestep.models.shapes import build_component, component_configs
from onestep.models.unet import enable_gradient_checkpointing, unet_x0


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def loss_and_grads(unet, x, t, condition):
    unet.zero_grad(set_to_none=True)
    loss = unet(x, t, **condition.unet_kwargs()).sample.float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    configs = component_configs("sd15")
    unet = build_component("unet", {**configs["unet"], "sample_size": args.latent_size}).train()
    x = torch.randn(1, 4, args.latent_size, args.latent_size)
    t = torch.tensor([500])
    condition = Condition(encoder_hidden_states=torch.randn(1, 77, 768))
    report = {"shape": "sd15", "latent_size": args.latent_size, "batch": 1,
              "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"}

    start = time.perf_counter()
    loss, grads = loss_and_grads(unet, x, t, condition)
    enable_gradient_checkpointing(unet)
    loss_ckpt, grads_ckpt = loss_and_grads(unet, x, t, condition)
    unet.disable_gradient_checkpointing()
    report["checkpointing"] = {
        "loss": float(loss), "loss_abs_diff": float((loss - loss_ckpt).abs()), "same_parameters": grads.keys() ==
        grads_ckpt.keys(), "max_grad_relative_diff": max(relative(grads_ckpt[n], g) for n, g in grads.items()),
        "seconds": time.perf_counter() - start}
    del grads, grads_ckpt

    start = time.perf_counter()
    with torch.no_grad():
        lora = LoRAConfig(rank=args.rank)
        adapted = unet.eval()
        add_lora(adapted, lora)
        for name, p in adapted.named_parameters():  # "trained" adapters: B is zero at injection
            if "lora_B" in name:
                p.normal_(std=0.02)
        out_lora = adapted(x, t, **condition.unet_kwargs()).sample
        merged = without_adapters(adapted, merge=True)
        out_merged = merged(x, t, **condition.unet_kwargs()).sample
        base = without_adapters(adapted, merge=False)
        out_base = base(x, t, **condition.unet_kwargs()).sample
        with tempfile.TemporaryDirectory() as folder:
            save_lora_weights(adapted, Path(folder))
            load_lora_weights(base, Path(folder))
        out_file = base(x, t, **condition.unet_kwargs()).sample
    report["lora_export"] = {"rank": args.rank, "adapter_effect_relative": relative(out_lora, out_base),
                             "merged_vs_adapter_max_abs": float((out_merged - out_lora).abs().max()),
        "merged_vs_adapter_relative": relative(out_merged, out_lora),
        "file_vs_adapter_relative": relative(out_file, out_lora), "seconds": time.perf_counter() - start}
    del merged, base

    start = time.perf_counter()
    plain = without_adapters(adapted, merge=False).eval()
    schedule = VPSchedule.from_scheduler(__import__("diffusers").PNDMScheduler.from_config(configs["scheduler"]))
    with torch.no_grad():
        x0_fp32 = unet_x0(plain, schedule, x, t, condition)
        x0_bf16 = unet_x0(plain.to(torch.bfloat16), schedule, x, t, condition)
    report["bf16_teacher"] = {"x0_relative_l2": relative(x0_bf16, x0_fp32),
                              "x0_max_abs": float((x0_bf16.float() - x0_fp32).abs().max()),
                              "seconds": time.perf_counter() - start}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
