"""`onestep sample` / `fid` on an exported stock `pipeline_diffusers/` folder run the student's one step, not the
teacher's 50-step sampler."""

import json

import numpy as np
import pytest
import torch

from onestep.cli import main
from onestep.export.pipeline import export_generator
from onestep.export.stock import ONE_STEP_MARK, stock_folder
from onestep.models.generator import Generator
from onestep.models.teacher import Teacher
from onestep.sampling.inference import load_sampler
from tests.conftest import sd_folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stock")
    teacher = Teacher.from_pretrained(sd_folder(tmp / "sd15", "sd15"))
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, timesteps=(999,)).eval()
    folder = export_generator(generator, teacher, tmp / "pipeline")
    (tmp / "prompts.txt").write_text("a cat\ndog\n")
    return folder, tmp / "prompts.txt"


def sample(capsys, folder, prompts, out) -> tuple[dict, np.ndarray]:
    assert main(["sample", str(folder), "--prompts", str(prompts), "--num-images", "3", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with np.load(out) as data:
        return result, data["images"]


def test_sample_on_the_stock_folder_runs_the_students_one_step(exported, tmp_path, capsys):
    folder, prompts = exported
    stock = stock_folder(folder)
    result, images = sample(capsys, stock, prompts, tmp_path / "stock.npz")
    assert result["nfe"] == 1
    _, expected = sample(capsys, folder, prompts, tmp_path / "student.npz")
    assert images.shape == expected.shape
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1  # the same images, up to uint8 rounding


def test_a_stock_export_written_before_the_mark_is_still_one_step(exported, tmp_path):
    folder, _ = exported
    import shutil

    old = tmp_path / "pipeline_diffusers"
    shutil.copytree(stock_folder(folder), old)
    shutil.copytree(folder, tmp_path / "pipeline")
    index = json.loads((old / "model_index.json").read_text())
    del index[ONE_STEP_MARK]
    (old / "model_index.json").write_text(json.dumps(index))
    sampler = load_sampler(old)
    assert sampler.kind == "stock" and sampler.nfe == 1
    with torch.no_grad():
        assert sampler.sample(None, 1, 0, prompts=["cat"]).shape == (1, 3, 16, 16)
    (tmp_path / "pipeline" / "model_index.json").unlink()  # no one-step student beside it: a plain SD folder
    assert load_sampler(old).kind == "teacher"
