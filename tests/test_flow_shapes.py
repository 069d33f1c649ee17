"""Flow-transformer shapes (onestep/assets/shapes/sd35m, flux, tiny_sd3, tiny_flux) and the memory bench's rows for
them: real sizes only on the meta device (nothing allocated), folders and estimates at tiny size."""

import json
from pathlib import Path

import pytest
import torch

from onestep.bench.memory import (
    LORA_RANK,
    REFERENCE,
    SHAPE_VARIANTS,
    estimate,
    flow_counts,
    markdown,
    run_shape_suite,
    scaled_reference,
)
from onestep.cli import main
from onestep.errors import UserInputError
from onestep.models.shapes import build_component, component_configs, write_random_teacher


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _meta_parameters(shape: str, name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_component(name, component_configs(shape)[name]).parameters())


def test_flow_shapes_have_the_published_parameter_counts():
    """Counted here on the meta device; the reference numbers: Stability AI's SD3.5 medium card says "2.5 billion
    parameters" (the MMDiT-X transformer counts 2.24 B in diffusers' SD3Transformer2DModel; the rest of the 2.5 B
    is rounding and the pooled/caption projections of the checkpoint as released: the brief's 2.24-2.5 B range);
    Black Forest Labs' FLUX.1-dev card "12 billion parameter rectified flow transformer" (11.9 B); T5-XXL's encoder
    4.76 B (google/t5-v1_1-xxl's encoder half); CLIP ViT-bigG/14's text tower 695 M as SDXL's text_encoder_2."""
    assert _meta_parameters("sd35m", "transformer") == 2_243_171_520
    assert _meta_parameters("flux", "transformer") == 11_901_408_320
    assert _meta_parameters("flux", "text_encoder_2") == 4_762_310_656  # T5-XXL encoder, SD3's text_encoder_3 too
    assert component_configs("sd35m")["text_encoder_3"] == component_configs("flux")["text_encoder_2"]
    assert _meta_parameters("sd35m", "text_encoder_2") == 694_659_840
    sd3, flux = component_configs("sd35m"), component_configs("flux")
    assert sd3["transformer"]["dual_attention_layers"] == list(range(13))
    assert sd3["transformer"]["qk_norm"] == "rms_norm" and sd3["scheduler"]["shift"] == 3.0
    assert (sd3["vae"]["shift_factor"], sd3["vae"]["scaling_factor"]) == (0.0609, 1.5305)
    assert (flux["vae"]["shift_factor"], flux["vae"]["scaling_factor"]) == (0.1159, 0.3611)
    assert flux["scheduler"]["use_dynamic_shifting"] and flux["transformer"]["guidance_embeds"]


@torch.no_grad()
def test_flow_teacher_folders_load_and_encode_as_their_pipelines(tmp_path):
    """The folders the bench writes: SD3 without its T5 (zeros of T5's 256 tokens beside CLIP's 77), FLUX with its
    T5 tokenizer padding to 512; `latent_size` moves only a sample size."""
    from onestep.models.teacher import Teacher

    sd3 = write_random_teacher("tiny_sd3", tmp_path / "sd3", latent_size=4, leave_out=("text_encoder_3",))
    index = json.loads((sd3 / "model_index.json").read_text())
    assert index["text_encoder_3"] == index["tokenizer_3"] == [None, None] and not (sd3 / "text_encoder_3").exists()
    teacher = Teacher.from_pretrained(sd3)
    condition = teacher.encode_prompts(["a red cat"])
    assert teacher.sample_shape == (4, 4, 4) and condition.encoder_hidden_states.shape == (1, 77 + 256, 32)
    assert condition.encoder_hidden_states[:, 77:].abs().max() == 0 and condition.text_embeds.shape == (1, 32)
    flux = Teacher.from_pretrained(write_random_teacher("tiny_flux", tmp_path / "flux", latent_size=4))
    condition = flux.encode_prompts(["a red cat"])
    assert flux.sample_shape == (4, 4, 4) and flux.embedded_guidance
    assert condition.encoder_hidden_states.shape == (1, 512, 32) and condition.text_embeds.shape == (1, 16)
    assert flux.unet.config.in_channels == 16 and json.loads((tmp_path / "flux" / "model_index.json").read_text())[
        "tokenizer_2"] == ["transformers", "T5TokenizerFast"]


def test_flow_counts_match_the_networks_built_for_real():
    """Adapters and GAN head counted on the meta device = those of a materialised tiny transformer with onestep's
    own LoRA and head; the activation scale is blocks x width x tokens."""
    from onestep.models.critics import TokenClassifier
    from onestep.models.lora import LoRAConfig, add_lora

    counts = flow_counts("tiny_flux", CONFIGS / "flux" / "dmd2.yaml")  # gan_depths [0.5]: one depth
    transformer = build_component("transformer", component_configs("tiny_flux")["transformer"])
    assert counts["transformer"] == sum(p.numel() for p in transformer.parameters())
    add_lora(transformer, LoRAConfig(rank=LORA_RANK))
    assert counts["adapters"] == sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n) > 0
    assert counts["head"] == sum(p.numel() for p in TokenClassifier(16, 1).parameters())
    assert counts["activation_scale"] == 2 * 16 * ((8 // 2) ** 2 + 512)  # 1 + 1 blocks, 2 x 8 wide, 8x8 latents
    sid = flow_counts("tiny_sd3", CONFIGS / "sd3" / "sid.yaml")
    assert sid["head"] == 0 and sid["activation_scale"] == 2 * 16 * (4 ** 2 + 333)
    frozen = {n: c for n, c in component_configs("tiny_sd3").items() if n not in ("scheduler", "text_encoder_3")}
    assert sid["frozen_parameters"] == sum(sum(p.numel() for p in build_component(n, c).parameters())
                                           for n, c in frozen.items())


def _reference_row() -> dict:
    """A measured DMD2 row as the bench stores it (MiB; a GAN head of 10 beside each network's 100 adapters)."""
    mib = 2**20
    return {"method": "dmd2", "variant": REFERENCE, "status": "measured, activations scaled",
            "trainable_parameters": {"generator": 100 * mib, "critic": 110 * mib},
            "lora_parameters": {"generator": 100 * mib, "critic": 100 * mib},
            "update_parameters": {"generator": 1100 * mib, "critic": 1110 * mib},
            "shared_parameters": {"generator": 1000 * mib, "critic": 1000 * mib},
            "weights_mib": 3000.0, "ema_mib": 0.0, "half_parameters": 1200 * mib, "gradients_mib": 440.0,
            "optimizer_mib": 1680.0, "activations_mib": 500.0, "teacher_unet_mib": 2000.0}


def test_scaled_reference_recomputes_each_part_from_the_counts():
    mib = 2**20
    source = {"transformer": 1000 * mib, "frozen_elements": 1250 * mib, "frozen_parameters": 1200 * mib,
              "adapters": 100 * mib, "head": 10 * mib, "activation_scale": 100}
    target = {"transformer": 5000 * mib, "frozen_elements": 5300 * mib, "frozen_parameters": 5300 * mib,
              "adapters": 300 * mib, "head": 40 * mib, "activation_scale": 500}
    row = scaled_reference(_reference_row(), source, target)
    assert row["trainable_parameters"] == {"generator": 300 * mib, "critic": 340 * mib}
    # 3000 - 2 x 1250 + 2 x 5300 (bf16 frozen) - 4 x 210 + 4 x 640 (float32 adapters and head)
    assert row["weights_mib"] == 3000 + 2 * (5300 - 1250) + 4 * (640 - 210)
    assert row["gradients_mib"] == 440.0 * 340 / 110 and row["optimizer_mib"] == 1680.0 * 640 / 210
    assert row["activations_mib"] == 500.0 * 5 and row["teacher_unet_mib"] == 2000.0 * 5
    assert row["shared_parameters"] == {"generator": 5000 * mib, "critic": 5000 * mib}
    assert row["update_parameters"]["critic"] == 5340 * mib and row["half_parameters"] == 5300 * mib
    assert row["accelerator_peak_mib"] == sum(row[k] for k in ("weights_mib", "gradients_mib", "optimizer_mib",
                                                               "activations_mib"))
    # a full fine-tune from it trains the target's whole transformer (float32 copy, 4 + 8 bytes per parameter)
    full = estimate(row, SHAPE_VARIANTS["bf16_ckpt"])
    assert full["trainable_parameters"]["critic"] == 5040 * mib and full["optimizer_mib"] == 8 * (5000 + 5040)


def test_flux_rows_are_estimated_from_a_sd35m_report(tmp_path, capsys):
    """`--shape tiny_flux --reference` (as `--shape flux` from sd35m): every row estimated and marked so, the
    reference row = scaled_reference of the measured one, the left-out T5 reported; a report of another shape and a
    bogus shape are refused in one line."""
    reference = tmp_path / "sd3.json"
    reference.write_text(json.dumps({"shape": "tiny_sd3", "latent_size": 4, "full_latent_size": 8, "steps": 1,
                                     "rows": [_reference_row()]}))
    out = tmp_path / "flux"
    assert main(["bench", "--suite", "memory", "--shape", "tiny_flux", "--methods", "dmd2", "--variants",
                 REFERENCE, "fp32", "--reference", str(reference), "--out", str(out)]) == 0
    report = json.loads((out / "memory.json").read_text())
    assert [r["variant"] for r in report["rows"]] == [REFERENCE, "fp32"]
    assert all(r["status"].startswith("estimated from tiny_sd3") for r in report["rows"])
    expected = scaled_reference(_reference_row(), flow_counts("tiny_sd3", CONFIGS / "sd3" / "dmd2.yaml"),
                                flow_counts("tiny_flux", CONFIGS / "flux" / "dmd2.yaml"))
    assert report["rows"][0]["accelerator_peak_mib"] == pytest.approx(expected["accelerator_peak_mib"])
    assert report["left_out"] == {"text_encoder_2": 1_036_400} and "text_encoder_2 (0.00 B" in markdown(report)
    capsys.readouterr()
    for bad, says in ((["--suite", "memory", "--shape", "bogus"], "unknown --shape 'bogus'"),
                      (["--suite", "memory", "--shape", "tiny_flux", "--reference", str(out / "memory.json")],
                       "shape 'tiny_flux'"),
                      (["--suite", "step-overhead", str(CONFIGS / "flux" / "sid.yaml"), "--shape", "tiny_flux"],
                       "never built here")):
        assert main(["bench", *bad, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
    with pytest.raises(UserInputError, match="unknown --shape"):
        run_shape_suite("sd3", tmp_path, ["dmd2"], [REFERENCE])
