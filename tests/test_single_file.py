"""Single-file checkpoints (the original SD / SDXL key layout of model sites, ComfyUI and A1111): one-step students
export as one, and single files load as teachers, both through diffusers' own `from_single_file`, offline."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from onestep.cli import main
from onestep.errors import UserInputError
from onestep.export import single_file as single
from onestep.export.pipeline import export_generator
from onestep.export.stock import stock_folder
from onestep.models.generator import Generator
from onestep.models.teacher import Teacher
from tests.conftest import sd_folder


DEMO_SID = "configs/sd15/sid.yaml"


def teacher_folder(root, kind: str):
    """A tiny SD1.5- or SDXL-shaped diffusers folder. SDXL's: its two text encoders differ in width as SDXL's do (768
    and 1280), which is how diffusers' `from_single_file` tells them apart (conftest's tiny SDXL has one width)."""
    if kind == "sd15":
        return sd_folder(root / kind, kind)
    from onestep.models.shapes import write_random_teacher

    return write_random_teacher("tiny_sdxl", root / kind)


def student_export(tmp_path, kind: str, t0: int):
    """A one-step student (the teacher's UNet moved off it, so the file cannot be the teacher's) exported."""
    teacher = Teacher.from_pretrained(teacher_folder(tmp_path, kind))
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, timesteps=(t0,)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in generator.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return teacher, export_generator(generator, teacher, tmp_path / "pipeline")


@pytest.mark.parametrize(("kind", "t0", "pipeline_cls", "layout"),
                         [("sd15", 999, StableDiffusionPipeline, "cond_stage_model.transformer.text_model."),
                          ("sdxl", 399, StableDiffusionXLPipeline, "conditioner.embedders.1.model.transformer.")])
@torch.no_grad()
def test_single_file_student_loads_back_with_from_single_file(tmp_path, kind, t0, pipeline_cls, layout):
    teacher, folder = student_export(tmp_path, kind, t0)
    file = single.single_file(folder)
    assert file == tmp_path / "pipeline.safetensors" and file.is_file()
    with safe_open(file, "pt") as weights:
        keys = list(weights.keys())
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
               for k in keys) and any(k.startswith(layout) for k in keys)
    with safe_open(file, "pt") as weights:  # the original VAE's attention is 1x1 convolutions
        assert weights.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]

    stock_dir = stock_folder(folder)
    loaded = pipeline_cls.from_single_file(str(file), config=str(stock_dir), local_files_only=True)
    stock = DiffusionPipeline.from_pretrained(stock_dir)
    for name in ("unet", "vae", "text_encoder", *(["text_encoder_2"] if kind == "sdxl" else [])):
        mine, theirs = getattr(loaded, name).state_dict(), getattr(stock, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert not torch.equal(loaded.unet.conv_in.weight, teacher.unet.conv_in.weight)  # the student, not the teacher
    prompts = ["a cat", "dog"]
    expected = stock(prompts, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(0),
                     output_type="pt").images
    images = loaded(prompts, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images
    assert loaded.scheduler.timesteps.tolist() == [t0] and torch.equal(images, expected)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@torch.no_grad()
def test_single_file_teacher_is_the_folder_teacher(tmp_path, kind):
    folder = teacher_folder(tmp_path, kind)
    file = single.export_single_file(folder, tmp_path / "model.safetensors")
    from_file, from_folder = Teacher.from_pretrained(file, config=folder), Teacher.from_pretrained(folder)
    assert from_file.force_zeros_for_empty_prompt == from_folder.force_zeros_for_empty_prompt
    assert type(from_file.scheduler) is type(from_folder.scheduler)
    cond = from_folder.encode_prompts(["a cat", "dog"])
    assert torch.equal(from_file.encode_prompts(["a cat", "dog"]).encoder_hidden_states, cond.encoder_hidden_states)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 900])
    assert torch.equal(from_file.x0(x_t, t, cond, 2.0), from_folder.x0(x_t, t, cond, 2.0))
    assert torch.equal(from_file.decode(x_t), from_folder.decode(x_t))


def test_single_file_teacher_needs_its_config_folder_in_one_line(tmp_path, sd15_folder, capsys):
    file = single.export_single_file(sd15_folder, tmp_path / "model.safetensors")
    base = ["train", DEMO_SID, f"output_dir={tmp_path / 'run'}", f"teacher.path={file}"]
    cases = [([], "set teacher.config to a diffusers folder"),
             ([f"teacher.config={tmp_path}"], "is not a diffusers folder"),
             ([f"teacher.config={tmp_path / 'elsewhere'}"], "is not a diffusers folder")]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    cases.append(([f"teacher.path={bad}", f"teacher.config={sd15_folder}"], "cannot load"))
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserInputError, match="teacher file not found"):
        Teacher.from_pretrained(tmp_path / "model.ckpt", config=sd15_folder)
    (tmp_path / "model.ckpt").write_bytes(b"pickled")
    with pytest.raises(UserInputError, match="pickle"):
        Teacher.from_pretrained(tmp_path / "model.ckpt", config=sd15_folder)


def test_a_single_file_teacher_trains_through_the_command_line(tmp_path):
    assert main(["tiny", "sd15", str(tmp_path / "tiny")]) == 0
    file = single.export_single_file(tmp_path / "tiny", tmp_path / "model.safetensors")
    assert main(["train", DEMO_SID, f"teacher.path={file}", f"teacher.config={tmp_path / 'tiny'}",
                 f"output_dir={tmp_path / 'run'}", "--tiny", str(tmp_path / "tiny")]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["teacher"]
    assert saved["path"] == str(file) and saved["config"] == str(tmp_path / "tiny")
    assert (tmp_path / "run" / "pipeline.safetensors").is_file()


def test_export_refuses_a_layout_that_does_not_convert_back(tmp_path, sd15_folder, monkeypatch):
    """The exported names are checked with diffusers' converters: a wrong name is an error, and nothing is written."""
    monkeypatch.setitem(single.UNET_RESNET, "conv2", "out_layers.2")
    with pytest.raises(ValueError, match="original layout of unet does not convert back"):
        single.export_single_file(sd15_folder, tmp_path / "model.safetensors")
    assert not list(tmp_path.glob("*model.safetensors*"))


def test_a_layout_without_an_original_equivalent_warns_and_keeps_the_export(tmp_path, monkeypatch):
    teacher, _ = student_export(tmp_path, "sd15", 999)
    monkeypatch.setitem(single.UNET_RESNET, "conv2", "out_layers.2")  # as a UNet the original layout cannot hold
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, timesteps=(999,))
    with pytest.warns(UserWarning, match="no single-file export beside .*again: the original layout of unet"):
        folder = export_generator(generator, teacher, tmp_path / "again")
    assert stock_folder(folder).is_dir() and not single.single_file(folder).exists()


def test_no_single_file_where_there_is_no_stock_folder(tmp_path):
    from tests.conftest import scheduler, tiny_unet, tiny_vae

    teacher = Teacher(tiny_unet(num_classes=3, channels=4), scheduler(), vae=tiny_vae())
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, timesteps=(999,))
    folder = export_generator(generator, teacher, tmp_path / "pipeline")
    assert json.loads((folder / "model_index.json").read_text())["num_classes"] == 3
    assert not single.single_file(folder).exists()
