"""Every CLI path that opens a user file, given random bytes, an empty file, a folder in place of a file or a file
in place of a folder: exit code 2 and one line on stderr, never a traceback."""

import os
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli import DEMO, ROOT, assert_one_line_error, run


FILE_KINDS = ["random_bytes", "empty", "folder"]  # what sits where a file is expected
FOLDER_KINDS = ["random_bytes", "empty_file", "empty_folder", "garbage_inside"]  # ... where a folder is expected


def bad_path(tmp_path: Path, kind: str, name: str) -> Path:
    path = tmp_path / name
    if kind in ("random_bytes", "garbage_inside"):
        target = path / "model_index.json" if kind == "garbage_inside" else path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(os.urandom(512))
        for inner in ("config.json", "unet") if kind == "garbage_inside" else ():
            (path / inner).write_bytes(os.urandom(512))
    elif kind in ("empty", "empty_file"):
        path.write_bytes(b"")
    else:
        path.mkdir()
    return path


def good_samples(tmp_path: Path) -> Path:
    path = tmp_path / "good.npz"
    np.savez(path, images=np.zeros((4, 8, 8, 1), np.uint8))
    return path


FILE_COMMANDS = {
    "train CONFIG": lambda p, tmp: ["train", p],
    "train data.prompts": lambda p, tmp: ["train", DEMO, f"output_dir={tmp / 'out'}", f"data.prompts={p}"],
    "fid SAMPLES.npz": lambda p, tmp: ["fid", p.with_suffix(".npz") if p.suffix != ".npz" else p],
    "fid --reference STATS.npz": lambda p, tmp: ["fid", good_samples(tmp), "--reference", p],
}
FOLDER_COMMANDS = {
    "train teacher.path": lambda p, tmp: ["train", DEMO, f"output_dir={tmp / 'out'}", f"teacher.path={p}"],
    "train init_generator": lambda p, tmp: ["train", DEMO, f"output_dir={tmp / 'out'}", f"init_generator={p}"],
    "train init_critic": lambda p, tmp: ["train", DEMO, f"output_dir={tmp / 'out'}", f"init_critic={p}"],
    "sample FOLDER": lambda p, tmp: ["sample", p, "--out", tmp / "grid.png", "--num-images", 2],
    "fid FOLDER": lambda p, tmp: ["fid", p, "--num-samples", 2],
    "export RUN_DIR": lambda p, tmp: ["export", p],
    "bench RUN_DIR": lambda p, tmp: ["bench", p, "--out", tmp / "bench"],
}


@pytest.mark.parametrize("kind", FILE_KINDS)
@pytest.mark.parametrize("command", sorted(FILE_COMMANDS))
def test_bad_file(tmp_path, capsys, command, kind):
    path = bad_path(tmp_path, kind, "input.npz" if "npz" in command else "input.txt")
    assert_one_line_error(*run(capsys, *FILE_COMMANDS[command](path, tmp_path)))


@pytest.mark.parametrize("kind", FOLDER_KINDS)
@pytest.mark.parametrize("command", sorted(FOLDER_COMMANDS))
def test_bad_folder(tmp_path, capsys, command, kind):
    path = bad_path(tmp_path, kind, "folder")
    assert_one_line_error(*run(capsys, *FOLDER_COMMANDS[command](path, tmp_path)))


def _corrupt_teacher(tmp: Path) -> list[str]:
    import shutil

    folder = tmp / "teacher"
    shutil.copytree(ROOT / "onestep" / "assets" / "digits_teacher", folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(4096))
    return ["train", DEMO, f"output_dir={tmp / 'out'}", f"teacher.path={folder}"]


def _corrupt_critic_checkpoint(tmp: Path) -> list[str]:
    run_dir = tmp / "stage1"
    checkpoint = run_dir / "checkpoints" / "checkpoint-0000001"
    checkpoint.mkdir(parents=True)
    (run_dir / "config.json").write_text('{"method": "dmd2"}')
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "model_1.safetensors").write_bytes(os.urandom(4096))
    return ["train", DEMO, f"output_dir={tmp / 'out'}", f"init_critic={run_dir}"]


def _corrupt_image(tmp: Path) -> list[str]:
    (tmp / "images").mkdir()
    (tmp / "images" / "0.png").write_bytes(os.urandom(512))
    return ["fid", good_samples(tmp), "--reference", tmp / "images"]


@pytest.mark.parametrize("make", [_corrupt_teacher, _corrupt_critic_checkpoint, _corrupt_image])
def test_corrupt_weights_and_images(tmp_path, capsys, make):
    assert_one_line_error(*run(capsys, *make(tmp_path)))
