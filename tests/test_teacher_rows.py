"""The teacher-row cache: keyed by the teacher's weights and the protocol, a hit returns what was stored, and the
rows shipped with the builtin teachers match the protocols `make demo` / `make demo-t2i` use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from onestep.bench import compare, teacher_rows
from onestep.bench.compare import teacher_row_protocol
from onestep.bench.teacher_rows import CARD_FILE, cached_row, lookup, row_key, store
from onestep.cli import build_parser
from onestep.models.loading import resolve_model
from tests.conftest import bench_run


ROOT = Path(__file__).resolve().parents[1]
DIGITS = resolve_model("builtin:digits")
PROTOCOL = {"table": "test", "steps": 4, "seeds": [0, 1, 2]}
ROW = {"name": "teacher DDIM 4", "fd": 17.25, "fds": [17.0, 17.5], "protocol": {"metric": "FD-digits"}}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test starts with an empty user cache (the copies of the digits teacher below share their key)."""
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def teacher(tmp_path) -> Path:
    folder = tmp_path / "teacher"
    shutil.copytree(DIGITS, folder, ignore=shutil.ignore_patterns(CARD_FILE))
    return folder


def test_key_follows_the_weights_and_the_protocol_not_the_card(teacher):
    key = row_key(teacher, PROTOCOL)
    assert row_key(teacher, dict(PROTOCOL)) == key
    assert row_key(teacher, {**PROTOCOL, "steps": 10}) != key
    assert row_key(teacher, {**PROTOCOL, "seeds": [0]}) != key
    (teacher / "README.md").write_text("a new card")  # what sampling does not read leaves the key alone
    store(teacher / CARD_FILE, teacher, {**PROTOCOL, "steps": 1}, ROW, "test")
    assert row_key(teacher, PROTOCOL) == key
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert row_key(teacher, PROTOCOL) != key
    config = teacher / "scheduler" / "scheduler_config.json"
    before = row_key(teacher, PROTOCOL)
    config.write_text(config.read_text().replace("trailing", "leading"))
    assert row_key(teacher, PROTOCOL) != before


def test_the_bench_protocol_names_the_judges_weights(monkeypatch, tmp_path):
    protocol = teacher_row_protocol(4, 1.0, 1000, [0, 1, 2])
    assert protocol != teacher_row_protocol(4, 2.0, 1000, [0, 1, 2])
    assert protocol != teacher_row_protocol(4, 1.0, 1000, [0, 1, 2], forget=[3])
    judge = tmp_path / "judge"
    shutil.copytree(compare.DIGITS_JUDGES["digits_mlp"], judge)
    (judge / "config.json").write_text((judge / "config.json").read_text() + " ")
    monkeypatch.setitem(compare.DIGITS_JUDGES, "digits_mlp", judge)
    assert teacher_row_protocol(4, 1.0, 1000, [0, 1, 2]) != protocol


def test_a_miss_is_computed_once_then_read_back(teacher):
    calls = []

    def compute():
        calls.append(1)
        return ROW

    assert cached_row(teacher, PROTOCOL, compute, "test") == ROW and len(calls) == 1
    hit = cached_row(teacher, PROTOCOL, compute, "test")
    assert len(calls) == 1
    assert {k: v for k, v in hit.items() if k != "cached"} == ROW and "by `test`" in hit["cached"]
    assert cached_row(teacher, {**PROTOCOL, "steps": 10}, compute, "test") == ROW and len(calls) == 2
    assert cached_row(teacher, PROTOCOL, compute, "test", use_cache=False) == ROW and len(calls) == 3


def test_the_card_file_is_read_first_and_a_damaged_entry_is_a_miss(teacher):
    shipped = {**ROW, "fd": 1.5}
    store(teacher / CARD_FILE, teacher, PROTOCOL, shipped, "shipped")
    row, source = lookup(teacher, PROTOCOL)
    assert row == shipped and source.startswith(f"{CARD_FILE}: ") and "by `shipped`" in source
    (teacher / CARD_FILE).write_text("{not json")
    assert lookup(teacher, PROTOCOL) is None
    assert cached_row(teacher, PROTOCOL, lambda: ROW, "test") == ROW


def test_the_bench_table_reads_its_teacher_rows_from_the_cache(tmp_path, monkeypatch):
    run = bench_run(tmp_path / "run")
    sampled = []
    original = compare.sample_teacher_row
    monkeypatch.setattr(compare, "sample_teacher_row", lambda t, p: sampled.append(p) or original(t, p))
    args = dict(num_samples=20, teacher_steps=[1], speed_batch=4, seeds=[0])
    first = compare.run_benchmark([run], tmp_path / "a", **args)["rows"][0]
    second = compare.run_benchmark([run], tmp_path / "b", **args)["rows"][0]
    assert len(sampled) == 1
    fresh = ("cached", "images_per_s", "speedup_vs_teacher")  # speeds are measured by every bench
    assert {k: v for k, v in second.items() if k not in fresh} == \
        {k: v for k, v in json.loads(json.dumps(first)).items() if k not in fresh}
    assert second["images_per_s"] > 0
    assert "teacher DDIM 1: " in (tmp_path / "b" / "benchmark.md").read_text()
    compare.run_benchmark([run], tmp_path / "c", **args, use_cache=False)
    assert len(sampled) == 2


def test_the_shipped_digits_rows_match_make_demo():
    """`make demo` reads every teacher row of its table from the card (else: run scripts/teacher_rows.py)."""
    from onestep.config import load_config

    cfg = load_config(ROOT / "configs" / "digits" / "dmd2.yaml")
    bench = build_parser().parse_args(["bench", "--out", "unused"])
    for k in bench.teacher_steps:
        protocol = teacher_row_protocol(k, cfg.teacher.guidance_scale, bench.num_samples or 1000, bench.seeds,
                                        bench.forget)
        hit = lookup(DIGITS, protocol)
        assert hit is not None and hit[1].startswith(CARD_FILE), k
        assert hit[0]["name"] == f"teacher DDIM {k}" and len(hit[0]["fds"]) == len(bench.seeds)
        assert hit[0]["images_per_s"] is None  # a machine's speed, measured by each bench


def test_the_shipped_t2i_rows_match_make_demo_t2i():
    """`make demo-t2i`'s table reads its teacher rows from the card: the protocol of a run of configs/t2i/dmd2.yaml
    (as scripts/t2i_table.py rebuilds it from the run's saved config)."""
    from onestep.bench.t2i_teacher import T2I_STEPS, t2i_teacher_protocol, table_config
    from onestep.config import config_from, load_config, to_dict
    from onestep.runs import build_judge

    cfg = load_config(ROOT / "configs" / "t2i" / "dmd2.yaml")
    cfg = table_config(config_from(json.loads(json.dumps(to_dict(cfg)))))  # a run folder's config.json, read back
    judge = build_judge(cfg, None, is_text=True)
    teacher = resolve_model(cfg.teacher.path)
    for k in T2I_STEPS:
        hit = lookup(teacher, t2i_teacher_protocol(cfg, judge, k))
        assert hit is not None and hit[1].startswith(CARD_FILE), k
        assert hit[0]["name"].startswith(f"teacher {k} DDIM") and hit[0]["fd_t2i"] > 0
    other = config_from(to_dict(cfg), ["eval.num_samples=500"])
    assert t2i_teacher_protocol(other, build_judge(other, None, is_text=True), 4) != \
        t2i_teacher_protocol(cfg, judge, 4)


def test_cache_dir_follows_onestep_cache(tmp_path):
    assert teacher_rows.cache_dir() == tmp_path / "cache" / "teacher_rows"
