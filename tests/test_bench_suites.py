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
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] / 10
