"""What an export writes on disk: the teacher's frozen components unchanged, and files other users can read."""

import os
import stat

import pytest
import torch
from diffusers import DiffusionPipeline

from onestep.export.frozen import FROZEN
from onestep.export.model_card import write_model_card
from onestep.export.pipeline import export_generator
from onestep.export.stock import stock_folder
from onestep.files import write_json_atomic
from onestep.models.generator import Generator
from onestep.models.teacher import Teacher
from onestep.pipelines import OneStepPipeline
from tests.conftest import sd_folder


def export_student(teacher_dir, out_dir, dtype=torch.bfloat16, t0=999):
    teacher = Teacher.from_pretrained(teacher_dir, dtype=dtype)
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, timesteps=(t0,)).eval()
    return export_generator(generator, teacher, out_dir)


# the recipes' teacher.dtype: bfloat16 used to store a bfloat16 VAE / text encoder in pipeline/ and float32 copies of
# those in pipeline_diffusers/ (1e-4 from the stock pipeline, where 1e-5 is promised)
@pytest.mark.parametrize(("kind", "t0"), [("sd15", 999), ("sdxl", 399)])
@torch.no_grad()
def test_exports_carry_the_teachers_frozen_files_unchanged(tmp_path, monkeypatch, kind, t0):
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl as sdxl

    teacher_dir = sd_folder(tmp_path / kind, kind)
    folder = export_student(teacher_dir, tmp_path / "pipeline", t0=t0)
    stock_dir = stock_folder(folder)
    components = [name for name in FROZEN if (teacher_dir / name).is_dir()]
    assert len(components) == (5 if kind == "sdxl" else 3)
    for export in (folder, stock_dir):
        for name in components:
            original = sorted(p.name for p in (teacher_dir / name).iterdir())
            assert sorted(p.name for p in (export / name).iterdir()) == original, (export, name)
            for file in original:
                assert (export / name / file).read_bytes() == (teacher_dir / name / file).read_bytes()

    monkeypatch.setattr(sdxl, "is_invisible_watermark_available", lambda: True)
    student = OneStepPipeline.from_pretrained(folder)  # as saved: no dtype asked for
    stock = DiffusionPipeline.from_pretrained(stock_dir)
    prompts = ["a cat", "dog"]
    expected = student(prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="pt").images
    images = stock(prompts, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
    assert (images - expected).abs().max() <= 1e-5


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_exported_files_keep_the_umasks_mode(tmp_path, umask_022):
    from onestep.eval.grid import save_grid

    folder = export_student(sd_folder(tmp_path / "sd15", "sd15"), tmp_path / "run" / "pipeline",
                            dtype=torch.float32)
    write_model_card(folder, {"method": "dmd2", "teacher": {"path": str(tmp_path / "sd15")}})
    save_grid(torch.zeros((2, 3, 8, 8), dtype=torch.uint8), tmp_path / "run" / "samples.png")
    write_json_atomic(tmp_path / "run" / "metrics.json", {"step": 1})
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {"README.md", "samples.png", "metrics.json", "model_index.json",
            "diffusion_pytorch_model.safetensors"} <= {p.name for p in files}
    assert any(stock_folder(folder) in p.parents for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
    folders = [p for p in (tmp_path / "run").rglob("*") if p.is_dir()]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {"0o755"}


@torch.no_grad()
def test_variant_and_pickle_components_travel_exactly(tmp_path):
    """A teacher read with `variant` exports that variant's files under the default names (a load without a variant
    reads them); a pickle-only text encoder is read from the teacher's file in float32 and saved as safetensors."""
    from tests.conftest import tiny_vae

    teacher_dir = sd_folder(tmp_path / "sd15", "sd15")
    tiny_vae(seed=1).save_pretrained(teacher_dir / "vae", variant="fp16")
    encoder_dir = teacher_dir / "text_encoder"
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(encoder_dir)
    (encoder_dir / "model.safetensors").unlink()
    torch.save(encoder.state_dict(), encoder_dir / "pytorch_model.bin")
    teacher = Teacher.from_pretrained(teacher_dir, dtype=torch.bfloat16, variant="fp16", allow_pickle=True)
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, timesteps=(999,)).eval()
    folder = export_generator(generator, teacher, tmp_path / "pipeline")
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (teacher_dir / "vae" / "diffusion_pytorch_model.fp16.safetensors").read_bytes()
    assert not list((folder / "vae").glob("*fp16*")) and not list((folder / "text_encoder").glob("*.bin"))
    exported = CLIPTextModel.from_pretrained(folder / "text_encoder")
    assert exported.dtype == torch.float32
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in exported.state_dict().items())
    vae, expected = OneStepPipeline.from_pretrained(folder).vae.state_dict(), tiny_vae(seed=1).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in vae.items())
