"""Every method trains, resumes and exports through `onestep train` on tiny SD3- and FLUX-shaped teacher folders."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from PIL import Image

from onestep.cli import main
from onestep.pipelines import OneStepPipeline


OPTIONS = {
    "dmd": {"regression": {"num_pairs": 2, "teacher_steps": 2, "batch_size": 2}},  # the teacher's Euler ODE pairs
    # GAN head on two depths of the transformer; LoRA on generator and critic over a bf16 teacher (shared base)
    "dmd2": {"generator_every": 1, "gan_depths": [0.5, 1.0], "lora": {"rank": 4, "critic": True}},
    "sid": {"gradient_checkpointing": True, "lora": {"rank": 4}},
    "sida": {},
    "sfd": {"forget_prompts": ["dog"]},
    "disback": {"num_checkpoints": 1, "steps_per_checkpoint": 1, "switch_every": 1},
    "msd": {"num_students": 2, "partition": "text_pca"},  # both students, then one MultiStudentPipeline
    "boot": {"num_grid_steps": 2},
}
TEACHER = {"dmd2": {"dtype": "bfloat16"}}  # and gradient checkpointing of every network for dmd2 and sid
CHECKPOINTING = ("dmd2", "sid")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_config(tmp_path, teacher, method: str) -> str:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    with open(images / "metadata.jsonl", "w") as f:
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": ["a cat", "dog"][i % 2]}) + "\n")
    cfg = {"method": method, "output_dir": str(tmp_path / "run"),
           "teacher": {"path": str(teacher), "guidance_scale": 2.0, **TEACHER.get(method, {})},
           "data": {"name": "image_folder", "image_dir": str(images), "batch_size": 2, "num_workers": 0},
           "train": {"max_steps": 2, "checkpoint_every": 2, "log_every": 1,
                     "gradient_checkpointing": method in CHECKPOINTING},
           "eval": {"num_samples": 4},
           "options": OPTIONS[method]}
    (tmp_path / "config.yaml").write_text(json.dumps(cfg))
    return str(tmp_path / "config.yaml")


@pytest.mark.parametrize("method", sorted(OPTIONS))
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_every_method_trains_resumes_and_exports_a_flow_student(tmp_path, sd3_dir, flux_dir, family, method):
    config = write_config(tmp_path, sd3_dir if family == "sd3" else flux_dir, method)
    assert main(["train", config]) == 0
    assert main(["train", config, "train.max_steps=3"]) == 0  # resumes from step 2's checkpoint
    out = tmp_path / "run"
    for run in [out / "student_0", out / "student_1"] if method == "msd" else [out]:
        events = [json.loads(line).get("event") for line in (run / "log.jsonl").read_text().splitlines()]
        assert events.count("started") == 1 and events.count("resumed") == 1, events
        assert json.loads((run / "metrics.json").read_text())["step"] == 3
    if method == "msd":
        check_multi_student(out)
        return
    student = OneStepPipeline.from_pretrained(out / "pipeline")
    assert student.is_flow
    with torch.no_grad():
        images = student(prompt=["a cat", "dog"], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    stock_dir = out / "pipeline_diffusers"
    if method == "boot":  # a signal read-out has no stock equivalent
        assert not stock_dir.exists()
        return
    stock = DiffusionPipeline.from_pretrained(stock_dir)
    assert type(stock) is (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline)
    guidance = 1.0 if family == "sd3" else 2.0  # FLUX.1-dev: the embedded guidance it was trained at
    with torch.no_grad():
        stock_images = stock(["a cat", "dog"], num_inference_steps=1, guidance_scale=guidance, height=16, width=16,
                             max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                             output_type="pt").images
    if method in TEACHER:  # the stock folder holds float32 copies of the bf16 text encoders and VAE
        assert torch.isfinite(stock_images).all()
    else:
        assert torch.allclose(stock_images, images, atol=1e-5)


@torch.no_grad()
def check_multi_student(out):
    """Each request of the assembled MultiStudentPipeline gets what its routed student's own pipeline gives."""
    from onestep.pipelines import MultiStudentPipeline

    multi = MultiStudentPipeline.from_pretrained(out / "pipeline")
    prompts = ["a cat", "dog"]
    z = torch.randn(2, *multi.sample_shape, generator=torch.Generator().manual_seed(0))
    latents = multi(prompt=prompts, latents=z, output_type="latent").images
    routed = multi.route(None, multi.encode_prompt(prompts)[0]).tolist()
    for i, k in enumerate(routed):
        own = OneStepPipeline.from_pretrained(out / f"student_{k}" / "pipeline")
        expected = own(prompt=prompts[i:i + 1], latents=z[i:i + 1], output_type="latent").images
        assert torch.allclose(latents[i:i + 1], expected, atol=1e-5)
    images = multi(prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
