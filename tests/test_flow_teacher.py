"""The miniature flow teacher (builtin:digits-flow): its training path (configs/flow/teacher.yaml at toy size)
exports a stock StableDiffusion3Pipeline with the data's latent statistics; the shipped folder loads in onestep and
in plain diffusers; a one-step DMD2 student of it exports a stock folder equal to its OneStepPipeline, and its table
(scripts/t2i_table.py, `make demo-flow`) names the teacher's rows as Euler steps."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline

from onestep.cli import main
from onestep.errors import UserInputError
from onestep.models.loading import resolve_path
from tests.test_flow_export import assert_stock_equals_student


ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red seven", "the number two"]
# configs/flow/teacher.yaml at toy size: 1 joint block 16 wide, CLIP-L / CLIP-G 8 wide (pooled 8 + 8), T5 16 wide
TINY_FLOW = ["train.max_steps=2", "train.max_minutes=null", "train.log_every=1", "data.batch_size=4",
             "eval.num_samples=8", "options.eval_steps=2", "options.export_dtype=float32",
             *[f"options.{enc}.{k}={v}" for enc in ("text_encoder", "text_encoder_2")
               for k, v in (("hidden_size", 8), ("intermediate_size", 16), ("num_hidden_layers", 1),
                            ("projection_dim", 8))],
             "options.text_encoder_3.d_model=16", "options.transformer.num_layers=1",
             "options.transformer.attention_head_dim=8", "options.transformer.joint_attention_dim=16",
             "options.transformer.caption_projection_dim=16", "options.transformer.pooled_projection_dim=16"]


def tiny_vae(folder: Path) -> Path:
    """A random AutoencoderKL 32x32x3 -> 8x8x4 (three blocks, as the miniature SD's), saved to `folder`."""
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(8, 8, 8), norm_num_groups=4, latent_channels=4,
                  sample_size=32).save_pretrained(folder)
    return folder


def data_latent_statistics(vae: AutoencoderKL) -> tuple[float, float]:
    """SD3's shift_factor and scaling_factor of the digits_t2i data, recomputed: the mean of the posterior means, and
    1 / std of posterior samples (noise from seed 0, in one draw over the whole data) around it."""
    from onestep.data.digits_t2i import load_digits_t2i

    images = load_digits_t2i().images
    with torch.no_grad():
        posterior = torch.cat([vae.encode(images[i:i + 1000]).latent_dist.parameters
                               for i in range(0, len(images), 1000)])
    mean, logvar = posterior.chunk(2, dim=1)
    z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape,
                                                                          generator=torch.Generator().manual_seed(0))
    shift = mean.mean()
    return shift.item(), 1.0 / (z - shift).std().item()


def test_flow_teacher_trains_and_exports_a_stock_sd3_folder(tmp_path):
    vae_dir = tiny_vae(tmp_path / "vae")
    out = tmp_path / "teacher"
    assert main(["train", str(ROOT / "configs/flow/teacher.yaml"), f"output_dir={out}", f"options.vae={vae_dir}",
                 *TINY_FLOW]) == 0
    losses = [line["unet/loss"] for line in map(json.loads, (out / "log.jsonl").read_text().splitlines())
              if "unet/loss" in line]
    assert losses and all(math.isfinite(v) for v in losses)
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert {"fd_t2i/teacher_euler2", "digit_acc/teacher_euler2"} <= set(final)  # Euler steps, not "ddim"

    folder = out / "pipeline"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert not list(folder.rglob("*.py"))
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)  # stock diffusers, no custom code
    images = pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=4.0, max_sequence_length=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and (images == images).all()

    shift, scale = data_latent_statistics(AutoencoderKL.from_pretrained(vae_dir))
    assert pipe.vae.config.shift_factor == pytest.approx(shift, rel=1e-4, abs=1e-6)
    assert pipe.vae.config.scaling_factor == pytest.approx(scale, rel=1e-4)


def test_builtin_flow_teacher_loads_in_onestep_and_in_stock_diffusers():
    from onestep.models.schedules import FlowSchedule
    from onestep.models.teacher import Teacher

    folder = resolve_path("builtin:digits-flow")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix != ".png")
    assert size < 10 * 2**20
    teacher = Teacher.from_pretrained("builtin:digits-flow")
    assert isinstance(teacher.schedule, FlowSchedule) and teacher.is_text and teacher.sample_shape == (4, 8, 8)
    assert teacher.text_encoder_3 is not None
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    image = pipe("a yellow seven", num_inference_steps=2, guidance_scale=4.0, max_sequence_length=16, height=32,
                 width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and (image == image).all()
    with pytest.raises(UserInputError, match="builtin:digits-flow"):  # a typo lists the builtins
        resolve_path("builtin:digits-flwo")


def test_one_step_student_of_the_builtin_exports_a_stock_folder_and_its_table(tmp_path, monkeypatch):
    from onestep.pipelines import OneStepPipeline

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "dmd2"
    assert main(["train", str(ROOT / "configs/flow/dmd2.yaml"), f"output_dir={out}", "train.max_steps=2",
                 "train.max_minutes=null", "data.batch_size=4", "eval.num_samples=8"]) == 0
    folder = out / "pipeline"
    assert_stock_equals_student(folder, OneStepPipeline.from_pretrained(folder), "sd3", PROMPTS)

    spec = importlib.util.spec_from_file_location("t2i_table", ROOT / "scripts" / "t2i_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.main([str(out), "--steps", "2", "--out", str(out / "table.json")]) == 0
    table_rows = json.loads((out / "table.json").read_text())
    rows = table_rows["rows"]
    assert [r["name"] for r in rows] == ["dmd2 1 step (dmd2)", "teacher 2 Euler (cfg 1.25)"]
    assert rows[0]["source"] == "the run's final evaluation"  # configs/flow records both judges
    assert rows[1]["fd_t2i"] > 0 and rows[1]["fd_t2i_mlp"] > 0 and 0 <= rows[1]["digit_acc"] <= 1
    assert rows[0]["ratio_t2i"] == pytest.approx(rows[0]["fd_t2i"] / rows[1]["fd_t2i"])
    assert rows[0]["ratio_t2i_mlp"] == pytest.approx(rows[0]["fd_t2i_mlp"] / rows[1]["fd_t2i_mlp"])
    assert rows[1]["ratio_t2i"] == rows[1]["ratio_t2i_mlp"] == 1 and rows[1]["judge_disagreement"] == 0
    assert "| teacher 2 Euler (cfg 1.25) |" in (out / "table.md").read_text()


def test_the_card_reads_the_folder_and_names_the_best_scale():
    from scripts.flow_teacher_card import card_text

    folder = resolve_path("builtin:digits-flow")
    vae = json.loads((folder / "vae" / "config.json").read_text())
    row = {"colour_acc": 1.0, "colour_balance": 0.1, "images_per_s": 10.0}
    sweep = {"teacher": "builtin:digits-flow", "num_samples": 1000, "protocol": "p", "rows": [
        {**row, "steps": 4, "guidance": 2.0, "fd_t2i": 10.0, "digit_acc": 0.99},  # fewer steps: not the rule's
        {**row, "steps": 25, "guidance": 1.0, "fd_t2i": 20.0, "digit_acc": 0.90},  # lowest FD, misses digits
        {**row, "steps": 25, "guidance": 3.0, "fd_t2i": 40.0, "digit_acc": 0.99},
        {**row, "steps": 25, "guidance": 4.0, "fd_t2i": 30.0, "digit_acc": 0.97}]}
    card = card_text(folder, sweep=sweep)
    assert f"scaling_factor {vae['scaling_factor']:.4f}" in card and "max_sequence_length=16" in card
    assert "Best scale at 25 steps: **4**" in card and "| 25 | 3 | 40.000 | 0.990 |" in card
    assert "Not measured yet" in card_text(folder) and "t2i_teacher_sweep.py builtin:digits-flow" in card_text(folder)
