"""`onestep bench --suite scaling | memory`: the numbers they derive (the launches themselves are benchmarks)."""

import json
from pathlib import Path

import pytest

from onestep.bench.memory import measure
from onestep.bench.scaling import throughput


CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits" / "dmd2.yaml"


def test_scaling_throughput_skips_warm_up_and_events(tmp_path):
    records = [{"step": 0, "event": "started"}, {"step": 5, "elapsed_s": 9.0}, {"step": 10, "elapsed_s": 10.0},
               {"step": 30, "elapsed_s": 14.0}, {"event": "eval", "step": 30, "elapsed_s": 14.0}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    row = throughput(tmp_path, global_batch=128, warmup=10)
    assert row == {"timed_steps": 20, "seconds_per_step": 0.2, "samples_per_s": 640.0}


def test_memory_measure_counts_what_trains(tmp_path):
    pytest.importorskip("peft")
    full = measure(CONFIG, ["data.batch_size=4"], tmp_path / "full")
    lora = measure(CONFIG, ["data.batch_size=4", "options.lora.rank=2", "options.lora.critic=true"], tmp_path / "lora")
    assert full["peak_mib"] >= full["built_mib"] > 0 and full["steps"] == 5
    assert 0 < sum(lora["trainable_parameters"].values()) < sum(full["trainable_parameters"].values()) / 10


def test_memory_measure_splits_what_it_holds(tmp_path):
    """Weights, gradients and optimizer state add up from the parameters (float32: 4 bytes, AdamW: 2 moments)."""
    row = measure(CONFIG, ["data.batch_size=2", "options.generator_every=1"], tmp_path / "m", steps=1)
    trainable = row["trainable_parameters"]
    assert set(trainable) == {"generator", "critic"} and row["steps"] == 1
    assert row["gradients_mib"] * 2**20 == max(trainable.values()) * 4
    steps = sum(trainable.values())  # AdamW's two float32 moments and a scalar step per parameter tensor
    assert steps * 8 <= row["optimizer_mib"] * 2**20 < steps * 8 + 2**16
    assert row["weights_mib"] * 2**20 >= sum(row["update_parameters"].values()) * 4
    assert set(row["seconds_per_update"]) == {"generator", "critic"} and row["seconds_per_step"] > 0


def test_memory_estimate_from_a_lora_reference():
    """A full fine-tune estimated from a LoRA run: the adapters leave, every base weight trains, AdamW or 8-bit."""
    from onestep.bench.memory import estimate

    mib = 2**20
    ref = {"trainable_parameters": {"generator": 10 * mib, "critic": 10 * mib},
           "update_parameters": {"generator": 110 * mib, "critic": 110 * mib}, "weights_mib": 1000.0, "ema_mib": 0.0,
           "half_parameters": 100 * mib, "activations_mib": 50.0, "teacher_unet_mib": 200.0}
    ckpt = ["teacher.dtype=bfloat16", "train.gradient_checkpointing=true"]
    lora = estimate(ref, [*ckpt, "options.lora.rank=64"])
    assert (lora["weights_mib"], lora["gradients_mib"], lora["optimizer_mib"]) == (1000.0, 40.0, 160.0)
    full = estimate(ref, ckpt)
    assert (full["weights_mib"], full["gradients_mib"], full["optimizer_mib"]) == (920.0, 400.0, 1600.0)
    eight_bit = estimate(ref, [*ckpt, "options.generator_optimizer.use_8bit=true"])
    assert eight_bit["optimizer_mib"] == 400.0
    fp32 = estimate(ref, ["teacher.dtype=float32", "train.mixed_precision=no"])
    assert fp32["weights_mib"] == 920.0 + 200.0 and fp32["activations_mib"] > 2 * 50.0  # no checkpointing either
    assert estimate(ref, [*ckpt, "teacher.offload=true"])["weights_mib"] == 920.0 - 200.0
    # a reference whose LoRA bases are the teacher's tensors (share_base): a full fine-tune needs float32 copies
    shared = {**ref, "shared_parameters": {"generator": 100 * mib, "critic": 100 * mib}}
    assert estimate(shared, [*ckpt, "options.lora.rank=64"])["weights_mib"] == 1000.0
    assert estimate(shared, ckpt)["weights_mib"] == 920.0 + 800.0
    assert estimate(shared, [*ckpt, "options.lora.rank=64", "options.lora.share_base=false"])["weights_mib"] == 1800.0


def test_real_size_shapes_match_the_published_parameter_counts():
    from onestep.models.shapes import parameter_counts

    counts = parameter_counts("sd15")
    assert round(counts["unet"] / 1e6, 1) == 859.5 and round(counts["vae"] / 1e6, 1) == 83.7
    assert round(counts["text_encoder"] / 1e6, 1) == 123.1


def test_eight_bit_adamw_needs_bitsandbytes(monkeypatch):
    import sys

    import torch

    from onestep.errors import UserInputError
    from onestep.training.updates import OptimizerConfig, make_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(UserInputError, match="bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimizerConfig(use_8bit=True))
