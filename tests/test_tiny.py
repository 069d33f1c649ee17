"""`onestep tiny KIND OUT` and `onestep train RECIPE --tiny OUT`: every recipe (SD1.5, SDXL, SD3, FLUX) runs on a
tiny random folder."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from onestep.cli import main
from onestep.pipelines import OneStepPipeline


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STOCK = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
         "flux": "FluxPipeline"}
RECIPES = sorted(str(p.relative_to(CONFIGS)) for kind in STOCK for p in (CONFIGS / kind).glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    for kind in STOCK:
        assert main(["tiny", kind, str(root / kind)]) == 0
    return {kind: root / kind for kind in STOCK}


@pytest.mark.parametrize("kind", sorted(STOCK))
@torch.no_grad()
def test_tiny_folders_load_with_diffusers_own_pipelines(tmp_path, capsys, kind):
    out = tmp_path / kind
    assert main(["tiny", kind, str(out)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["folder"] == str(out) and info["pipeline"] == STOCK[kind]
    assert info["try"] == f"onestep train configs/{kind}/dmd2.yaml --tiny {out}"
    assert (CONFIGS / kind / "dmd2.yaml").is_file() and len(list((out / "images").glob("*.png"))) == 4
    side = Image.open(out / "images" / "0.png").size
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == STOCK[kind]
    size = {"height": 32, "width": 32} if kind == "flux" else {}  # FLUX's default side would be 256 px
    images = pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                  **size).images
    assert images.shape[:2] == (1, 3) and torch.isfinite(images).all()
    if kind == "flux":  # no sample size in FLUX's transformer: the VAE's 16 px, as tests/test_flow_train.py trains at
        assert side == (16, 16)
    else:  # the data's images are at the side the stock pipeline draws by default (the teacher's resolution)
        assert side == tuple(images.shape[-2:])
    if kind == "sdxl":  # as SDXL base's model_index.json says, so onestep's teacher conditions as diffusers does
        assert pipe.config.force_zeros_for_empty_prompt


def test_tiny_never_writes_into_an_existing_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["tiny", "sd15", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "mine"
    assert main(["train", str(CONFIGS / "sd15" / "sid.yaml"), "--tiny", str(tmp_path)]) == 2
    assert "not a folder written by `onestep tiny`" in capsys.readouterr().err


# each recipe as shipped (Inception FID, CLIP score, /data and /models paths, bf16, 8 loader workers ...), with the one
# --tiny override: its evaluation is off, so no FID network, reference or CLIP model is demanded
@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.slow) if r == "sd15/msd.yaml" else r
                                    for r in RECIPES])  # MSD trains two students: ~24 s
def test_every_recipe_runs_on_a_tiny_folder_with_one_override(tiny_folders, recipe):
    folder = tiny_folders[recipe.split("/")[0]]
    assert main(["train", str(CONFIGS / recipe), "--tiny", str(folder)]) == 0
    out = folder / "runs" / recipe.replace("/", "_").removesuffix(".yaml")
    runs = sorted(out.glob("student_*")) or [out]  # MSD trains its students one after another
    for run in runs:
        assert json.loads((run / "metrics.json").read_text())["step"] == 2 and (run / "samples.png").is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
    if recipe.startswith(("sd3/", "flux/")):  # the flow student draws at the tiny teacher's 16 px
        student = OneStepPipeline.from_pretrained(out / "pipeline")
        with torch.no_grad():
            images = student(prompt=["a red cat"], generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert student.is_flow and images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
