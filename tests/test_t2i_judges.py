"""The second t2i judge ("t2i_mlp"): another network than the first, registered as features and as the metric
fd_t2i_mlp, on both judges in the t2i table and `onestep bench`, and beside FD in the convergence suite."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from onestep.data.digits_t2i import coloured_digits
from onestep.errors import UserInputError
from onestep.eval.quantize import to_uint8, uint8_to_float


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """One FD-statistics cache for this module (each judge reads the 7188 real images once); no user cache."""
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path_factory.getbasetemp() / "t2i_judges_cache"))


def _train_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_t2i_classifier", ROOT / "scripts" / "train_t2i_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_second_judge_is_another_network_with_other_errors():
    from onestep.eval.features import FeatureOptions, feature_spec
    from onestep.eval.t2i_classifier import T2I_JUDGES, ColouredDigitsMLP, load_t2i_judge

    first, second = load_t2i_judge("t2i"), load_t2i_judge("t2i_mlp")
    assert isinstance(second, ColouredDigitsMLP) and not any(isinstance(m, torch.nn.Conv2d) for m in second.modules())
    assert (first.config.num_features, second.config.num_features) == (64, 128)
    assert (T2I_JUDGES["t2i_mlp"] / "diffusion_pytorch_model.safetensors").stat().st_size <= 2 ** 20
    images, digits, colours = coloured_digits()
    idx = torch.arange(0, 7188, 8)  # 899 images, every colour
    x = to_uint8(images[idx])
    net = feature_spec("t2i_mlp").build(FeatureOptions())
    with torch.no_grad():
        features = net(x)
        assert features.shape == (len(idx), 128) and torch.equal(features, net(x))  # eval mode: no dropout
        assert torch.allclose(features, second.features(uint8_to_float(x)))
        (da, _), (db, cb) = first(uint8_to_float(x)), second(uint8_to_float(x))
    wrong_a, wrong_b = da.argmax(1) != digits[idx], db.argmax(1) != digits[idx]
    assert wrong_b.float().mean() < 0.05 and (cb.argmax(1) == colours[idx]).float().mean() > 0.99
    assert (wrong_a & wrong_b).sum() < 0.5 * min(wrong_a.sum(), wrong_b.sum())  # not the same mistakes
    # the features are not a relabelling of the first judge's: their distance matrices rank pairs differently
    fa = first.features(uint8_to_float(x[:300])).double()
    dist_a, dist_b = torch.cdist(fa, fa).flatten(), torch.cdist(features[:300].double(), features[:300].double())
    assert torch.corrcoef(torch.stack([dist_a, dist_b.flatten()]))[0, 1] < 0.95


def test_a_tiny_mlp_judge_trains_and_its_augmentation_keeps_each_colour():
    script = _train_script()
    images, digits, colours = coloured_digits()
    idx = torch.arange(0, 7188, 450)
    model = script.train(images[idx], digits[idx], colours[idx], steps=3, seed=1, batch_size=8, augment="jitter",
                         label_smoothing=0.1, architecture="mlp", hidden=(16,), num_features=8, dropout=0.1)
    digit_logits, colour_logits = model(images[idx])
    assert digit_logits.shape == (len(idx), 10) and colour_logits.shape == (len(idx), 4)
    assert model.features(images[idx]).shape == (len(idx), 8)
    train_idx, test_idx = script.coloured_halves(digits, "second")
    assert len(np.intersect1d(train_idx, test_idx)) == 0 and len(train_idx) + len(test_idx) == 7188
    assert np.array_equal(np.sort(test_idx), np.sort(script.coloured_halves(digits, "first")[0]))
    jittered = script.jitter(images, torch.Generator().manual_seed(0))
    assert jittered.min() >= -1 and jittered.max() <= 1 and not torch.equal(jittered, images)
    # the colour stays its class: per colour, the channels lit in the data stay the brightest on average
    level = (jittered + 1).mean((2, 3))  # (N, 3) mean channel intensity in [0, 2]
    for c, rgb in enumerate(((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0))):
        lit, dark = torch.tensor(rgb, dtype=torch.bool), ~torch.tensor(rgb, dtype=torch.bool)
        rows = level[colours == c]
        assert (rows[:, lit].min(1).values > 3 * rows[:, dark].max(1).values).float().mean() > 0.99


def test_fd_t2i_mlp_is_the_frechet_distance_of_its_features_and_a_metric_beside_fd_t2i():
    from scipy import linalg

    from onestep.eval.fd import frechet_distance
    from onestep.eval.metrics import MetricContext, SampleBatch, build_metric, run_metrics
    from onestep.eval.t2i_classifier import T2IFeatures, load_t2i_judge

    real = to_uint8(coloured_digits()[0])
    fake = real[torch.arange(0, 7188, 9)]
    result = frechet_distance(fake, "digits_t2i", "t2i_mlp")
    net = T2IFeatures(load_t2i_judge("t2i_mlp"))
    with torch.no_grad():
        a, b = net(real).double().numpy(), net(fake).double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert result.value == pytest.approx(direct, rel=1e-4) and result.value > 0
    assert result.protocol["metric"] == "FD-t2i_mlp" and "MLP" in result.protocol["extractor"]
    values, _ = run_metrics([build_metric("fd_t2i_mlp", MetricContext())],
                            [SampleBatch(fake[:400]), SampleBatch(fake[400:])])
    assert values["fd_t2i_mlp"] == pytest.approx(result.value, rel=1e-6)


def _t2i_run(folder: Path, final: dict) -> Path:
    from onestep.config import load_config, to_dict

    folder.mkdir(parents=True)
    cfg = load_config(ROOT / "configs" / "t2i" / "dmd2.yaml", [f"output_dir={folder}"])
    (folder / "config.json").write_text(json.dumps(to_dict(cfg)))
    (folder / "metrics.json").write_text(json.dumps({"final": final, "history": []}))
    return folder


STUDENT = {"fd_t2i/student": 90.0, "digit_acc/student": 0.96, "colour_acc/student": 0.99,
           "colour_balance/student": 0.12, "images_per_s/student": 400.0, "fd_t2i_mlp/student": 0.6}


def _store_teacher_rows(steps: dict[int, tuple[float, float]]) -> None:
    """Teacher rows in the user cache, as a first table would have stored them, for both judges."""
    from onestep.bench import t2i_teacher
    from onestep.bench.teacher_rows import cache_dir, row_key, store
    from onestep.config import load_config
    from onestep.models.loading import resolve_model
    from onestep.runs import build_judge

    cfg = t2i_teacher.table_config(load_config(ROOT / "configs" / "t2i" / "dmd2.yaml"))
    judge, teacher = build_judge(cfg, None, is_text=True), resolve_model("builtin:digits-t2i")
    for k, (fd_a, fd_b) in steps.items():
        metrics = {f"{c}/teacher_ddim{k}": 0.5 for c in t2i_teacher.COLUMNS}
        metrics.update({f"fd_t2i/teacher_ddim{k}": fd_a, f"fd_t2i_mlp/teacher_ddim{k}": fd_b})
        rows = t2i_teacher._judge_rows(f"teacher {k} DDIM (cfg 2)", metrics, f"/teacher_ddim{k}", "p")
        for features, row in rows.items():
            protocol = t2i_teacher.t2i_teacher_protocol(cfg, judge, k, features)
            store(cache_dir() / f"{row_key(teacher, protocol)}.json", teacher, protocol, row, "test")


def test_the_t2i_table_has_both_judges_their_ratios_and_agreement_on_every_row(tmp_path, capsys):
    from onestep.cli import main

    _store_teacher_rows({2: (100.0, 1.0), 3: (60.0, 0.5)})
    run = _t2i_run(tmp_path / "dmd2", STUDENT)
    assert main(["bench", str(run), "--out", str(tmp_path / "bench"), "--teacher-steps", "2", "3"]) == 0
    table = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    student, fewer, most = table["rows"]
    assert [student["name"], most["name"]] == ["dmd2 1 step (dmd2)", "teacher 3 DDIM (cfg 2)"]
    assert student["source"] == "the run's final evaluation" and set(fewer["cached"]) == {"t2i", "t2i_mlp"}
    assert student["ratio_t2i"] == pytest.approx(90 / 60) and student["ratio_t2i_mlp"] == pytest.approx(0.6 / 0.5)
    assert student["judge_disagreement"] == pytest.approx(abs(1.5 - 1.2) / 1.5)
    assert fewer["ratio_t2i"] == pytest.approx(100 / 60) and fewer["ratio_t2i_mlp"] == pytest.approx(2.0)
    assert most["ratio_t2i"] == most["ratio_t2i_mlp"] == 1 and most["judge_disagreement"] == 0
    md = (tmp_path / "bench" / "benchmark.md").read_text()
    assert "| FD-t2i ↓ | ratio (t2i) | FD-t2i_mlp ↓ | ratio (t2i_mlp) | judges' disagreement |" in md
    assert "| dmd2 1 step (dmd2) | 90.00 | 1.50 | 0.6000 | 1.20 | 20.0% |" in md
    import importlib.util  # scripts/t2i_table.py prints and writes the same table

    spec = importlib.util.spec_from_file_location("t2i_table", ROOT / "scripts" / "t2i_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(run), "--steps", "2", "3", "--out", str(tmp_path / "table.json")]) == 0
    assert json.loads((tmp_path / "table.json").read_text())["rows"] == table["rows"]
    old = _t2i_run(tmp_path / "old", {k: v for k, v in STUDENT.items() if not k.startswith("fd_t2i_mlp")})
    capsys.readouterr()
    assert script.main([str(old), "--steps", "2", "3"]) == 2  # no second judge and no pipeline/ to sample
    assert "lacks fd_t2i_mlp" in capsys.readouterr().err


def test_the_first_judges_teacher_rows_keep_their_key():
    """The second judge in eval.metrics does not move the first judge's teacher rows (the shipped card's keys)."""
    import dataclasses

    from onestep.bench.t2i_teacher import t2i_teacher_protocol
    from onestep.config import load_config
    from onestep.runs import build_judge

    cfg = load_config(ROOT / "configs" / "t2i" / "dmd2.yaml")
    judge = build_judge(cfg, None, is_text=True)
    without = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, metrics=["digit_acc", "colour_acc",
                                                                                   "colour_balance"]))
    assert t2i_teacher_protocol(cfg, judge, 4) == t2i_teacher_protocol(without, judge, 4)
    second = t2i_teacher_protocol(cfg, judge, 4, "t2i_mlp")
    assert second["judge"] == "t2i_mlp" and second["evaluator"] != t2i_teacher_protocol(cfg, judge, 4)["evaluator"]


def test_teacher_rows_are_sampled_at_eval_teacher_guidance_scale(tmp_path):
    """A student distilled at one real-score guidance is compared with the teacher at eval.teacher_guidance_scale:
    the table's teacher rows (and their cache key) are those of a run whose teacher.guidance_scale is that scale."""
    from onestep.bench.compare import finished_runs
    from onestep.bench.t2i_teacher import t2i_teacher_protocol, table_config
    from onestep.config import config_from, load_config, reference_guidance, to_dict
    from onestep.runs import build_judge

    base = to_dict(load_config(ROOT / "configs" / "t2i" / "dmd2.yaml"))
    split = table_config(config_from(base, ["teacher.guidance_scale=1.5", "eval.teacher_guidance_scale=3"]))
    plain = table_config(config_from(base, ["teacher.guidance_scale=3", "eval.teacher_guidance_scale=null"]))
    unset = table_config(config_from(base, ["teacher.guidance_scale=1.5", "eval.teacher_guidance_scale=null"]))
    assert split.teacher.guidance_scale == 3 and unset.teacher.guidance_scale == 1.5
    judge = build_judge(split, None, is_text=True)
    assert t2i_teacher_protocol(split, judge, 4) == t2i_teacher_protocol(plain, judge, 4)
    assert t2i_teacher_protocol(split, judge, 4) != t2i_teacher_protocol(unset, judge, 4)
    saved = to_dict(config_from(base, ["teacher.guidance_scale=1.5", "eval.teacher_guidance_scale=3"]))
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert reference_guidance(saved) == 3 and finished_runs([tmp_path])[2] == 3  # `onestep bench`'s teacher rows
    del saved["eval"]["teacher_guidance_scale"]  # a run saved before the field
    assert reference_guidance(saved) == 1.5
    with pytest.raises(UserInputError, match="eval.teacher_guidance_scale must be >= 0"):
        config_from(base, ["eval.teacher_guidance_scale=-1"])


def _history_run(folder: Path, method: str, fds: list[float], second: list[float], acc: list[float],
                 balance: list[float]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": method}))
    history = [{"step": 500 * (i + 1), "elapsed_s": 60.0 * i, "fd_t2i/student": a, "fd_t2i_mlp/student": b,
                "digit_acc/student": c, "colour_acc/student": 1.0, "colour_balance/student": d,
                "images_per_s/student": 300.0, "protocol": "p"}
               for i, (a, b, c, d) in enumerate(zip(fds, second, acc, balance, strict=True))]
    (folder / "metrics.json").write_text(json.dumps({"history": history}))
    return folder


def test_convergence_reads_t2i_runs_with_both_judges_and_their_metrics(tmp_path):
    from onestep.bench.convergence import convergence_report, markdown, run_convergence

    runs = [_history_run(tmp_path / "d0", "dmd2", [150, 120, 110], [1.0, 0.8, 0.7], [0.9, 0.95, 0.96],
                         [0.1, 0.15, 0.2]),
            _history_run(tmp_path / "d1", "dmd2", [150, 110, 100], [1.2, 0.8, 0.9], [0.9, 0.93, 0.98],
                         [0.1, 0.05, 0.1]),
            _history_run(tmp_path / "s0", "sid", [140, 100, 90], [0.9, 0.7, 0.6], [0.92, 0.96, 0.97],
                         [0.2, 0.2, 0.3])]
    report = convergence_report(runs, "dmd2")
    dmd2, sid = report["methods"]["dmd2"], report["methods"]["sid"]
    assert dmd2["fd_key"] == "fd_t2i" and dmd2["fd_mean"] == [150, 115, 105] and report["target_fd"] == 105
    assert sid["steps_to_target"] == 1000 and dmd2["steps_to_target"] == 1500
    assert set(dmd2["series"]) == {"fd_t2i_mlp", "digit_acc", "colour_balance"}  # colour_acc is not plotted
    assert dmd2["series"]["fd_t2i_mlp"]["mean"] == pytest.approx([1.1, 0.8, 0.8])
    assert dmd2["series"]["digit_acc"]["std"][-1] == pytest.approx(np.std([0.96, 0.98], ddof=1))
    assert sid["series"]["colour_balance"]["mean"] == [0.2, 0.2, 0.3] and sid["series"]["digit_acc"]["std"] == [0] * 3
    md = markdown(report)
    assert "final fd_t2i (mean ± std)" in md and "final fd_t2i_mlp | final colour_balance | final digit_acc |" in md
    run_convergence(runs, tmp_path / "out", "dmd2")
    from PIL import Image

    with Image.open(tmp_path / "out" / "convergence.png") as png:  # four panels: FD-t2i, FD-t2i_mlp, acc, balance
        assert png.width > 2 * png.height
    digits = _history_run(tmp_path / "g0", "sid", [1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0])
    history = json.loads((digits / "metrics.json").read_text())["history"]
    for h in history:
        h["fd_digits/student"] = h.pop("fd_t2i/student")
    (digits / "metrics.json").write_text(json.dumps({"history": history}))
    from onestep.errors import UserInputError

    with pytest.raises(UserInputError, match="different feature spaces"):
        convergence_report([*runs[:2], digits], "dmd2")
    assert os.path.exists(tmp_path / "out" / "convergence.md")
