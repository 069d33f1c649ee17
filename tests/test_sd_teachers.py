"""Stable Diffusion-class teachers (SD1.x epsilon, SD2.x v-prediction, SDXL) through diffusers' own loading: by
folder and by Hub id from the local cache, conditioned exactly as diffusers' pipelines condition them, and
distilled, resumed and exported by every distiller."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from onestep.cli import main
from onestep.errors import UserInputError
from onestep.models.conditioning import Condition
from onestep.models.loading import resolve_model
from onestep.models.teacher import Teacher
from onestep.sampling.inference import load_sampler
from tests.conftest import hub_snapshot, sd_folder, tiny_sdxl_unet


DEMO = Path(__file__).resolve().parents[1] / "configs" / "digits" / "dmd2.yaml"
PROMPTS = ["a cat", "dog", "a b cat", "c dog", "a dog", "b cat", "d e cat", "a b c d e f g h"]


def diffusers_pipeline(teacher: Teacher):
    """diffusers' own pipeline around the teacher's parts: the reference for how prompts condition the UNet."""
    parts = dict(unet=teacher.unet, vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                 scheduler=teacher.scheduler)
    if teacher.text_encoder_2 is None:
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(**parts, text_encoder_2=teacher.text_encoder_2, tokenizer_2=teacher.tokenizer_2,
                                     force_zeros_for_empty_prompt=teacher.force_zeros_for_empty_prompt)


@pytest.mark.parametrize("kind, prediction_type", [("sd15", "epsilon"), ("sd2", "v_prediction"),
                                                   ("sdxl", "epsilon")])
@torch.no_grad()
def test_sd_folders_load_and_condition_as_diffusers_does(tmp_path, kind, prediction_type):
    teacher = Teacher.from_pretrained(sd_folder(tmp_path / kind, kind), guidance_scale=3.0)
    assert teacher.schedule.prediction_type == prediction_type and teacher.is_text and teacher.vae is not None
    prompts = ["a cat", "dog"]
    cond = teacher.encode_prompts(prompts)
    pipe = diffusers_pipeline(teacher)
    if kind != "sdxl":
        embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
        assert cond.text_embeds is None and cond.time_ids is None
    else:
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu")
        assert teacher.force_zeros_for_empty_prompt  # model_index.json of SDXL base says so
        assert torch.equal(cond.text_embeds, pooled) and not negative_pooled.any()
        time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                          teacher.text_encoder_2.config.projection_dim)
        assert teacher.image_size == (16, 16) and torch.equal(cond.time_ids, time_ids.expand(2, 6))
    assert torch.equal(cond.encoder_hidden_states, embeds)
    null = teacher.null_condition(cond)
    assert torch.equal(null.encoder_hidden_states, negative)
    if kind == "sdxl":
        assert torch.equal(null.text_embeds, negative_pooled) and torch.equal(null.time_ids, cond.time_ids)

    # the guided x0 is the teacher's UNet called as diffusers calls it, cond and uncond, read out by prediction type
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    guided = teacher.x0(x_t, t, cond)
    added = {} if kind != "sdxl" else {"added_cond_kwargs": {"text_embeds": torch.cat([negative_pooled, pooled]),
                                                             "time_ids": torch.cat([cond.time_ids] * 2)}}
    out_u, out_c = teacher.unet(torch.cat([x_t] * 2), torch.cat([t] * 2), torch.cat([negative, embeds]),
                                **added).sample.chunk(2)
    abar = teacher.scheduler.alphas_cumprod[500]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    to_x0 = ((lambda v: alpha * x_t - sigma * v) if prediction_type == "v_prediction"
             else (lambda eps: (x_t - sigma * eps) / alpha))
    assert torch.allclose(guided, to_x0(out_u) + 3.0 * (to_x0(out_c) - to_x0(out_u)), atol=1e-5)


@torch.no_grad()
def test_sdxl_null_condition_is_the_empty_prompt_without_force_zeros(sdxl_folder):
    teacher = Teacher.from_pretrained(sdxl_folder)
    teacher.force_zeros_for_empty_prompt = False
    embeds, negative, pooled, negative_pooled = diffusers_pipeline(teacher).encode_prompt(["a cat"], device="cpu")
    null = teacher.unconditional(3)
    assert torch.equal(null.encoder_hidden_states, negative.expand(3, -1, -1)) and negative.any()
    assert torch.equal(null.text_embeds, negative_pooled.expand(3, -1))
    assert null.time_ids.shape == (3, 6)


def test_condition_passes_sdxl_conditions_as_added_cond_kwargs():
    cond = Condition(encoder_hidden_states=torch.randn(2, 3, 4), text_embeds=torch.randn(2, 8),
                     time_ids=torch.ones(2, 6))
    kwargs = cond.unet_kwargs(torch.bfloat16)
    assert set(kwargs) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    assert kwargs["added_cond_kwargs"]["text_embeds"].dtype == torch.bfloat16
    assert Condition.cat([cond, cond[:1]]).time_ids.shape == (3, 6)
    assert Condition(class_labels=torch.tensor([1])).unet_kwargs(torch.bfloat16)["class_labels"].dtype == torch.long


@torch.no_grad()
def test_over_long_prompts_are_truncated_with_a_warning(sdxl_folder, caplog, capfd):
    import logging
    import warnings

    teacher = Teacher.from_pretrained(sdxl_folder)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as raw, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        long = teacher.encode_prompts(["a b c d e f g h"])  # BOS + 8 words + EOS > 8
    # a log line per tokenizer, no Python warning (printed with a source path), no transformers "indexing errors"
    assert [w.message for w in raw] == []
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all(m.startswith("prompt truncated to 8 tokens") for m in messages), messages
    assert "loses 'g h'" in messages[0]
    assert "indexing errors" not in capfd.readouterr().err
    caplog.clear()
    teacher.encode_prompts(["a b c d e f g h"])
    assert caplog.records == []  # once per prompt: a training run draws it again and again
    short = teacher.encode_prompts(["a b c d e f"])  # what the truncated prompt keeps (BOS ... EOS, 8 tokens)
    assert torch.equal(long.encoder_hidden_states, short.encoder_hidden_states)
    assert torch.equal(long.text_embeds, short.text_embeds)


def test_hub_ids_load_from_the_local_cache_only(tmp_path, hub_cache, sdxl_folder, capsys):
    snapshot = hub_snapshot(hub_cache, "tiny/sdxl", sdxl_folder)
    other = hub_snapshot(hub_cache, "tiny/sdxl", sd_folder(tmp_path / "sd2", "sd2"), commit="1" * 40, ref="v2")
    assert resolve_model("tiny/sdxl") == snapshot and resolve_model("tiny/sdxl", revision="v2") == other
    assert resolve_model("tiny/sdxl", revision="1" * 40) == other
    assert Teacher.from_pretrained("tiny/sdxl").text_encoder_2 is not None
    assert load_sampler("tiny/sdxl").kind == "teacher"  # onestep sample / fid take Hub ids too
    assert Teacher.from_pretrained("tiny/sdxl", revision="v2").schedule.prediction_type == "v_prediction"
    with pytest.raises(UserInputError, match="hf download tiny/sdxl --revision v3"):
        Teacher.from_pretrained("tiny/sdxl", revision="v3")
    with pytest.raises(UserInputError, match="revision"):
        Teacher.from_pretrained(sdxl_folder, revision="v2")
    capsys.readouterr()
    code = main(["train", str(DEMO), f"output_dir={tmp_path / 'out'}", "teacher.path=tiny/missing"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "hf download tiny/missing" in err, err
    assert not (tmp_path / "out").exists()
    code = main(["train", str(DEMO), f"output_dir={tmp_path / 'out'}", "teacher.path=tiny/sdxl",
                 "teacher.revision=v3", "teacher.variant=fp16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("hf download tiny/sdxl --revision v3"), err


def test_variant_weights_are_the_ones_loaded(sdxl_folder):
    tiny_sdxl_unet(seed=1).save_pretrained(sdxl_folder / "unet", variant="fp16")
    default, variant = Teacher.from_pretrained(sdxl_folder), Teacher.from_pretrained(sdxl_folder, variant="fp16")
    weight = "conv_in.weight"
    assert torch.equal(variant.unet.state_dict()[weight], tiny_sdxl_unet(seed=1).state_dict()[weight])
    assert not torch.equal(default.unet.state_dict()[weight], variant.unet.state_dict()[weight])
    with pytest.raises(UserInputError, match="no weights of variant 'int8'"):
        Teacher.from_pretrained(sdxl_folder, variant="int8")
    (sdxl_folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # as `hf download --include *.fp16.*`
    with pytest.raises(UserInputError, match="only variant weights .fp16.: set teacher.variant"):
        Teacher.from_pretrained(sdxl_folder)


def test_pickle_only_text_encoder_is_refused_unless_allowed(sdxl_folder):
    from safetensors.torch import load_file

    assert Teacher.from_pretrained(sdxl_folder, allow_pickle=True).text_encoder_2 is not None  # safetensors still
    folder = sdxl_folder / "text_encoder_2"
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UserInputError, match="pickle"):
        Teacher.from_pretrained(sdxl_folder)
    loaded = Teacher.from_pretrained(sdxl_folder, allow_pickle=True).text_encoder_2.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


METHOD_OPTIONS = {
    "dmd2": "generator_every: 1\n  gan: false",
    "sid": "alpha: 1.0",
    "sfd": ("forget_prompts: ['a dog']\n  prompt_rewrites: {'dog': 'cat'}\n  critic_forget_weight: 1.0\n"
            "  generator_forget_weight: 1.0"),
    "msd": "num_students: 2\n  partition: text_pca\n  generator_every: 1\n  gan: false",
    "disback": "num_checkpoints: 2\n  steps_per_checkpoint: 1\n  switch_every: 1\n  generator_every: 1\n  gan: false",
    "boot": "num_grid_steps: 4",
}


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_every_distiller_trains_resumes_and_exports_an_sdxl_student(tmp_path, sdxl_folder, method, caplog):
    from onestep import pipelines

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    (tmp_path / "config.yaml").write_text(f"""method: {method}
output_dir: {out}
teacher:
  path: {sdxl_folder}
  guidance_scale: 2.0
data:
  name: prompts
  prompts: {tmp_path / 'prompts.txt'}
  batch_size: 2
train:
  max_steps: 2
  log_every: 1
  checkpoint_every: 2
eval:
  num_samples: 8  # no judge for text teachers (FD-digits does not apply)
options:
  {METHOD_OPTIONS[method]}
""")
    assert main(["train", str(tmp_path / "config.yaml")]) == 0
    assert "'a b c d e f g h' loses 'g h'" in caplog.text  # over-long: truncated, not refused
    assert main(["train", str(tmp_path / "config.yaml"), "train.max_steps=3"]) == 0  # resumes at step 2
    runs = [out / f"student_{k}" for k in range(2)] if method == "msd" else [out]
    for run in runs:
        events = [json.loads(line).get("event") for line in (run / "log.jsonl").read_text().splitlines()]
        assert events.count("started") == 1 and events.count("resumed") == 1, events
        assert json.loads((run / "metrics.json").read_text())["step"] == 3
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    pipe = getattr(pipelines, index["_class_name"]).from_pretrained(out / "pipeline")
    images = pipe(prompt=["a cat", "dog"], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    unet = "unet_0" if method == "msd" else "unet"
    assert UNet2DConditionModel.from_pretrained(out / "pipeline", subfolder=unet).config.addition_embed_type == \
        "text_time"


@torch.no_grad()
def test_exported_sdxl_student_samples_what_the_generator_gives(tmp_path, sdxl_folder):
    """The exported OneStepPipeline, loaded with plain diffusers, conditions the student as the teacher did."""
    from diffusers import DiffusionPipeline

    from onestep import build_distiller
    from onestep.data.conditions import ConditionSampler
    from onestep.distillers.dmd import DMDOptions

    teacher = Teacher.from_pretrained(sdxl_folder)
    conditions = ConditionSampler(prompts=PROMPTS, encode=teacher.encode_prompts)
    dmd = build_distiller("dmd2", teacher, DMDOptions(gan=False), conditions=conditions, batch_size=2)
    dmd.export_pipeline(tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe", custom_pipeline=str(tmp_path / "pipe" /
                                             "pipeline_onestep.py"), trust_remote_code=True)
    images = pipe(prompt=["a cat", "dog"], generator=torch.Generator().manual_seed(0), output_type="pt").images
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    sample = dmd.generator.sample(z, teacher.encode_prompts(["a cat", "dog"]))
    assert torch.allclose(images, (teacher.decode(sample).clamp(-1, 1) + 1) / 2, atol=1e-4)


@torch.no_grad()
def test_sdxl_pipeline_takes_precomputed_embeddings(sdxl_folder):
    from onestep.pipelines import OneStepPipeline

    teacher = Teacher.from_pretrained(sdxl_folder)
    pipe = OneStepPipeline(teacher.unet, teacher.scheduler, vae=teacher.vae, text_encoder=teacher.text_encoder,
                           tokenizer=teacher.tokenizer, text_encoder_2=teacher.text_encoder_2,
                           tokenizer_2=teacher.tokenizer_2, timesteps=[399])
    expected = pipe(prompt=["a cat", "a cat", "dog", "dog"], generator=torch.Generator().manual_seed(0),
                    output_type="pt").images
    embeds, pooled = pipe.encode_prompt(["a cat", "dog"])
    given = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_images_per_prompt=2,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(given, expected)
    with pytest.raises(ValueError, match="pooled"):
        pipe(prompt_embeds=embeds)


def test_sdxl_folders_that_cannot_be_conditioned_are_refused(sdxl_folder):
    torch.manual_seed(0)
    refiner = UNet2DConditionModel.from_config({**tiny_sdxl_unet().config,  # 5 time ids: an aesthetic score
                                                "projection_class_embeddings_input_dim": 8 + 5 * 8})
    refiner.save_pretrained(sdxl_folder / "unet")
    with pytest.raises(UserInputError, match="takes 5 time ids"):
        Teacher.from_pretrained(sdxl_folder)
    for name in ("text_encoder_2", "tokenizer_2"):
        shutil.rmtree(sdxl_folder / name)
    with pytest.raises(UserInputError, match="needs text_encoder/ and text_encoder_2/"):
        Teacher.from_pretrained(sdxl_folder)
