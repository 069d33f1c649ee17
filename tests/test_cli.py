"""Bad input ends with exit code 2 and one line on stderr, and touches nothing already on disk."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onestep.cli import main


ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "digits" / "dmd2.yaml"


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("override, words", [
    (["optoins.gan=false"], ["optoins"]),  # typo'd top-level key
    (["options.gan_wieght=1"], ["gan_wieght"]),  # typo'd method key
    (["train.max_steps=ten"], ["max_steps"]),  # wrong type
    (["options.generator_optimizer.lr=-1e-4"], ["lr", "> 0"]),  # impossible value
    (["data.batch_size=0"], ["batch_size"]),
    (["method=dmd3"], ["dmd3"]),
    (["teacher.path=/nonexistent/teacher"], ["not found"]),
])
def test_bad_configs_exit_2(tmp_path, capsys, override, words):
    code, err = run(capsys, "train", DEMO, f"output_dir={tmp_path / 'out'}", *override)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_missing_config_and_broken_yaml(tmp_path, capsys):
    assert_one_line_error(*run(capsys, "train", tmp_path / "nope.yaml"), "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dmd2\noutput_dir: [unclosed\n")
    assert_one_line_error(*run(capsys, "train", bad), "bad config")


def test_image_folder_is_resized_to_the_teacher(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 20), 40 * i, np.uint8)).save(folder / f"{i}.png")
    code, err = run(capsys, "train", DEMO, f"output_dir={tmp_path / 'out'}", "data.name=image_folder",
                    f"data.image_dir={folder}", "data.num_workers=0", "options.gan=true", "train.max_steps=1",
                    "eval.num_samples=10", "eval.sampling_batch=10")
    assert code == 0, err


def test_output_dir_of_another_run_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"method": "sid", "data": {}, "teacher": {}, "options": {}}))
    (out / "precious.txt").write_text("keep me")
    code, err = run(capsys, "train", DEMO, f"output_dir={out}")
    assert_one_line_error(code, err, "different run", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    assert json.loads((out / "config.json").read_text())["method"] == "sid"


def test_sample_and_fid_bad_inputs(tmp_path, capsys):
    assert_one_line_error(*run(capsys, "sample", tmp_path, "--out", tmp_path / "x.png"), "model_index.json")
    assert_one_line_error(*run(capsys, "sample", "builtin:digits", "--out", tmp_path / "x.jpg"), ".png")
    assert_one_line_error(*run(capsys, "fid", tmp_path / "missing.npz"), "not found")
    np.savez(tmp_path / "f.npz", images=np.zeros((4, 8, 8, 1), np.float32))
    assert_one_line_error(*run(capsys, "fid", tmp_path / "f.npz"), "uint8")
    assert_one_line_error(*run(capsys, "sample", "builtin:digits", "--out", tmp_path / "x.png", "--num-images", "-3"),
                          "> 0")


def test_sample_teacher_and_fid_of_npz(tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", "builtin:digits", "--steps", "2", "--num-images", "20", "--out", str(out)]) == 0
    with np.load(out) as data:
        assert data["images"].shape == (20, 8, 8, 1) and data["images"].dtype == np.uint8
        assert list(data["labels"][:10]) == list(range(10))
    assert main(["fid", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["protocol"]["metric"] == "FD-digits" and result["protocol"]["num_samples"] == 20


def test_fid_forgetting_metrics(tmp_path, capsys):
    assert main(["fid", "builtin:digits", "--steps", "4", "--num-samples", "100", "--forget", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["forgetting"]
    assert result["classified_as_forgotten/class_0"] >= 0.8  # the teacher has forgotten nothing
    assert result["unlearning_accuracy/class_0"] == pytest.approx(1 - result["classified_as_forgotten/class_0"])
    assert result["fd_digits/remaining_classes"] > 0
    assert_one_line_error(*run(capsys, "fid", "builtin:digits", "--steps", "1", "--forget", "10"), "does not exist")
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    assert_one_line_error(*run(capsys, "fid", tmp_path / "s.npz", "--forget", "0"), "pipeline or teacher folder")


def test_console_script_exit_code_is_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "onestep.cli", "train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr


def test_more_bad_inputs_exit_2_and_touch_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    disback = ROOT / "configs" / "digits" / "disback.yaml"
    outside = tmp_path / "elsewhere"
    assert_one_line_error(*run(capsys, "train", disback, f"output_dir={tmp_path / 'out'}",
                               f"options.path_dir={outside}"), "outside output_dir")
    assert not outside.exists()
    sfd = ROOT / "configs" / "digits" / "sfd.yaml"
    assert_one_line_error(*run(capsys, "train", sfd, f"output_dir={tmp_path / 'sfd'}", "options.forget=[12]"),
                          "class 12 does not exist")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")  # one unreadable image is skipped and counted; none readable: exit 2
    (folder / "b.png").write_bytes(b"")
    code, err = run(capsys, "train", DEMO, f"output_dir={tmp_path / 'img'}", "data.name=image_folder",
                    f"data.image_dir={folder}", "data.num_workers=0", "options.gan=true")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert sum("skipped an unreadable image" in line for line in lines) == 2, err  # a warning per skipped image
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and "no readable image" in errors[0] and "2 skipped" in errors[0], err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    from onestep.data.prompts import read_prompts
    from onestep.errors import UserInputError

    with pytest.raises(UserInputError, match="empty lines \\(line 2\\)"):
        read_prompts(prompts)


def test_same_config_and_seed_give_the_same_samples_and_metrics(tmp_path):
    from safetensors.torch import load_file

    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["train", str(DEMO), f"output_dir={out}", "train.max_steps=3", "train.max_minutes=null",
                     "train.eval_every=0", "eval.num_samples=50", "data.batch_size=8"]) == 0
        weights = load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
        outputs.append((json.loads((out / "metrics.json").read_text())["final"], weights))
    (metrics_a, weights_a), (metrics_b, weights_b) = outputs
    assert metrics_a["fd_digits/student"] == metrics_b["fd_digits/student"]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_a_moved_run_folder_exports_its_own_checkpoint(tmp_path):
    from safetensors.torch import load_file

    trained, moved = tmp_path / "trained", tmp_path / "moved"
    assert main(["train", str(DEMO), f"output_dir={trained}", "train.max_steps=2", "train.max_minutes=null",
                 "train.eval_every=0", "eval.num_samples=20", "data.batch_size=4"]) == 0
    weights = "pipeline/unet/diffusion_pytorch_model.safetensors"
    exported = load_file(trained / weights)
    trained.rename(moved)
    shutil.rmtree(moved / "pipeline")
    assert main(["export", str(moved)]) == 0
    again = load_file(moved / weights)
    assert all(torch.equal(exported[k], again[k]) for k in exported)
    assert not trained.exists()  # the folder it trained in is neither read nor recreated


def test_export_step_exports_that_checkpoint_beside_the_newest(tmp_path):
    from safetensors.torch import load_file

    short, long = tmp_path / "short", tmp_path / "long"
    common = [str(DEMO), "train.max_minutes=null", "train.eval_every=0", "eval.num_samples=20", "data.batch_size=4",
              "options.generator_every=1"]  # a generator update at every step
    assert main(["train", *common, f"output_dir={short}", "train.max_steps=2"]) == 0
    assert main(["train", *common, f"output_dir={long}", "train.max_steps=4", "train.checkpoint_every=2",
                 "train.keep_checkpoints=5"]) == 0
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert main(["export", str(long), "--step", "2"]) == 0
    at_2, at_4 = load_file(long / "pipeline-2" / weights), load_file(long / "pipeline" / weights)
    trained_2 = load_file(short / "pipeline" / weights)  # training is deterministic: the same weights at step 2
    assert all(torch.equal(at_2[k], trained_2[k]) for k in at_2)
    assert not all(torch.equal(at_2[k], at_4[k]) for k in at_2)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_inputs_against_a_finished_run_leave_every_file_byte_identical(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(DEMO), f"output_dir={out}", "train.max_steps=2", "train.max_minutes=null",
                 "train.eval_every=0", "eval.num_samples=20", "data.batch_size=4"]) == 0
    capsys.readouterr()
    before = _snapshot(out)
    bad = [
        ["train", DEMO, f"output_dir={out}", "options.gan_wieght=1"],  # unknown key
        ["train", DEMO, f"output_dir={out}", "train.max_steps=two"],  # wrong type
        ["train", DEMO, f"output_dir={out}", "options.generator_every=0"],  # impossible value
        ["train", DEMO, f"output_dir={out}", "teacher.path=/nonexistent"],  # missing teacher
        ["train", DEMO, f"output_dir={out}", "options.generator_timesteps=[200]"],  # a different run
        ["train", ROOT / "configs" / "digits" / "sfd.yaml", f"output_dir={out}", "options.forget=[10]"],
        ["export", tmp_path / "not_a_run"],
        ["export", out, "--step", "1"],  # no checkpoint kept at that step
        ["sample", out, "--out", out / "grid.jpg"],
        ["fid", out / "pipeline", "--reference", tmp_path / "missing.npz"],
    ]
    for argv in bad:
        code, err = run(capsys, *argv)
        assert_one_line_error(code, err)
    assert _snapshot(out) == before
