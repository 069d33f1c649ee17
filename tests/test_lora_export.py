"""LoRA students as LoRAs people use: diffusers' `load_lora_weights` applies the exported LoRA (diffusers' format, and
kohya's, read through diffusers' kohya converter) to the stock teacher and gives the merged export's images."""

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open

from onestep.export.pipeline import export_generator
from onestep.export.single_file import single_file
from onestep.export.stock import stock_folder
from onestep.models.generator import Generator
from onestep.models.loading import load_scheduler
from onestep.models.lora import KOHYA_WEIGHTS, LORA_WEIGHTS, LoRAConfig, add_lora
from onestep.models.teacher import Teacher
from tests.conftest import sd_folder


pytest.importorskip("peft")
PROMPTS = ["a cat", "dog"]


def one_step(pipe) -> torch.Tensor:
    return pipe(PROMPTS, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


@pytest.mark.parametrize(("kind", "t0"), [("sd15", 999), ("sdxl", 399)])
@torch.no_grad()
def test_lora_export_applies_to_the_stock_teacher(tmp_path, kind, t0):
    teacher_dir = sd_folder(tmp_path / kind, kind)
    teacher = Teacher.from_pretrained(teacher_dir)
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, timesteps=(t0,)).eval()
    add_lora(generator.unet, LoRAConfig(rank=2, alpha=1.0))  # scale alpha / rank = 0.5: a kohya alpha must carry it
    torch.manual_seed(1)
    for name, p in generator.unet.named_parameters():
        if "lora_B" in name:  # B starts at zero: without this the LoRA would change nothing
            p.normal_(0, 0.1)
    merged = export_generator(generator, teacher, tmp_path / "merged", lora="merge")
    adapter = export_generator(generator, teacher, tmp_path / "adapter", lora="adapter")
    stock = stock_folder(adapter)
    assert (stock / LORA_WEIGHTS).is_file() and (stock / KOHYA_WEIGHTS).is_file()
    assert single_file(merged).is_file() and not single_file(adapter).exists()  # that file would be the teacher
    with safe_open(stock / KOHYA_WEIGHTS, "pt") as kohya:
        keys = list(kohya.keys())
        assert all(k.startswith("lora_unet_") for k in keys)
        assert {kohya.get_tensor(k).item() for k in keys if k.endswith(".alpha")} == {1.0}
    expected = one_step(DiffusionPipeline.from_pretrained(stock_folder(merged)))

    pipe = DiffusionPipeline.from_pretrained(stock)  # the stock adapter folder: its base UNet, then its LoRA
    base = one_step(pipe)
    pipe.load_lora_weights(stock)
    torch.testing.assert_close(one_step(pipe), expected, rtol=0, atol=1e-5)
    assert (base - expected).abs().max() > 1e-2  # the LoRA is what makes the student

    for weight_name in (LORA_WEIGHTS, KOHYA_WEIGHTS):  # the user's own teacher folder, the student's scheduler
        pipe = DiffusionPipeline.from_pretrained(teacher_dir)
        pipe.scheduler = load_scheduler(stock / "scheduler")
        pipe.load_lora_weights(stock, weight_name=weight_name)
        torch.testing.assert_close(one_step(pipe), expected, rtol=0, atol=1e-5)
