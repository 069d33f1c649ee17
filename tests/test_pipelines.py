"""Exported pipelines: the one-step recursion, the teacher sampler with guidance, the three ways to load a folder."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel

from onestep.export.pipeline import export_generator, export_pipeline
from onestep.models.generator import Generator
from onestep.models.teacher import Teacher
from onestep.pipelines import ClassConditionalDiffusionPipeline, OneStepPipeline
from tests.conftest import scheduler, tiny_text_unet, tiny_unet, tiny_vae


NUM_CLASSES = 10


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def read_x0(unet, sched, x, t, labels=None):
    """Direct x0 read-out of one UNet call, in float64 from alphas_cumprod."""
    abar = sched.alphas_cumprod.double()[t]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    out = unet(x, torch.full((x.shape[0],), t), class_labels=labels).sample.double()
    kind = sched.config.prediction_type
    return {"epsilon": lambda: (x - sigma * out) / alpha, "v_prediction": lambda: alpha * x - sigma * out,
            "sample": lambda: out}[kind]()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(-1, 1) / 2 + 0.5).float()


@pytest.fixture(scope="module", autouse=True)
def one_thread_native_convolutions():
    """Tiny models on a busy CPU: oneDNN's per-shape kernel JIT and a second thread's barriers cost seconds a call."""
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return tiny_unet(num_classes=NUM_CLASSES).eval()


@pytest.fixture(scope="module")
def pipe(unet) -> OneStepPipeline:
    return OneStepPipeline(unet, scheduler())


# --- the generator recursion ----------------------------------------------------------------------------------------
@torch.no_grad()
def test_one_step_equals_direct_v_prediction_read_out(pipe, unet):
    labels = [3, 7]
    images = pipe(class_labels=labels, generator=seeded(), output_type="pt").images
    z = torch.randn((2, 1, 8, 8), generator=seeded())
    sched = pipe.scheduler
    assert sched.alphas_cumprod[999] == 0  # zero terminal SNR: the input is pure noise, x0 = -v
    sigma = (1 - sched.alphas_cumprod.double()[999]).sqrt()
    expected = read_x0(unet, sched, (sigma * z).float(), 999, torch.tensor(labels))
    assert torch.allclose(images, to_unit(expected), atol=1e-6)
    assert pipe.config.timesteps == [999] and pipe.config.num_classes == NUM_CLASSES


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_x0_read_out_per_prediction_type(unet, kind):
    pipe = OneStepPipeline(unet, scheduler(kind, zero_snr=False))
    out, x_t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    abar = pipe.scheduler.alphas_cumprod.double()[700]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    expected = {"epsilon": (x_t - sigma * out) / alpha, "v_prediction": alpha * x_t - sigma * out, "sample": out}[kind]
    assert torch.allclose(pipe.to_x0(out, x_t, 700), expected.float(), atol=1e-5)


@torch.no_grad()
def test_multi_step_recursion_uses_fresh_noise(unet):
    sched = scheduler(zero_snr=False)
    steps = [999, 600, 250]
    pipe = OneStepPipeline(unet, sched, timesteps=steps)
    labels = torch.tensor([1, 9])
    images = pipe(class_labels=labels, generator=seeded(1), output_type="pt").images
    g = seeded(1)
    abar = sched.alphas_cumprod.double()
    x = (1 - abar[999]).sqrt() * torch.randn((2, 1, 8, 8), generator=g)
    x0 = read_x0(unet, sched, x.float(), 999, labels)
    for t in steps[1:]:
        x = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * torch.randn((2, 1, 8, 8), generator=g)
        x0 = read_x0(unet, sched, x.float(), t, labels)
    assert torch.allclose(images, to_unit(x0), atol=1e-5)
    one_step = OneStepPipeline(unet, sched)
    override = one_step(class_labels=labels, generator=seeded(1), timesteps=steps, output_type="pt")
    assert torch.equal(override.images, images)


def test_seeded_calls_are_deterministic_and_labels_default_balanced(pipe):
    first = pipe(batch_size=12, generator=seeded(5), output_type="np").images
    again = pipe(batch_size=12, generator=seeded(5), output_type="np").images
    explicit = pipe(class_labels=[i % NUM_CLASSES for i in range(12)], generator=seeded(5), output_type="np").images
    other = pipe(batch_size=12, generator=seeded(6), output_type="np").images
    assert first.shape == (12, 8, 8, 1) and first.min() >= 0 and first.max() <= 1
    assert np.array_equal(first, again) and np.array_equal(first, explicit) and not np.array_equal(first, other)
    pil = pipe(class_labels=[0], generator=seeded(5)).images[0]
    assert pil.mode == "L" and pil.size == (8, 8)
    assert np.array_equal(np.asarray(pil), (first[0, ..., 0] * 255).round().astype(np.uint8))
    assert isinstance(pipe(class_labels=[0], output_type="pt", return_dict=False), tuple)


@pytest.mark.parametrize("call", [dict(class_labels=[10]), dict(class_labels=[-1]), dict(timesteps=[500, 999]),
                                  dict(timesteps=[1000]), dict(output_type="latents")])
def test_bad_arguments_raise(pipe, call):
    with pytest.raises(ValueError):
        pipe(**call)


@torch.no_grad()
def test_class_conditional_unet2dcondition_without_text():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                up_block_types=("UpBlock2D",) * 2, mid_block_type=None, num_class_embeds=4,
                                cross_attention_dim=8)
    pipe = OneStepPipeline(unet, scheduler())
    images = pipe(batch_size=3, generator=seeded(), output_type="pt").images
    z = torch.randn((3, 1, 8, 8), generator=seeded())
    out = unet(z, torch.full((3,), 999), None, class_labels=torch.arange(3)).sample
    assert pipe.config.num_classes == 3 and torch.allclose(images, to_unit(-out), atol=1e-6)
    with pytest.raises(ValueError, match="with a prompt"):
        OneStepPipeline(tiny_text_unet(channels=1), scheduler())()


@torch.no_grad()
def test_latent_generator_decodes_with_vae(tmp_path):
    unet, vae = tiny_unet(num_classes=None, channels=4).eval(), tiny_vae().eval()
    pipe = OneStepPipeline(unet, scheduler(), vae=vae)
    images = pipe(batch_size=2, generator=seeded(), output_type="pt").images
    x0 = -unet(torch.randn((2, 4, 8, 8), generator=seeded()), 999).sample  # ZTSNR v_prediction at t = T-1
    expected = vae.decode(x0 / vae.config.scaling_factor).sample
    assert images.shape == (2, 3, 16, 16) and torch.allclose(images, to_unit(expected), atol=1e-5)
    loaded = OneStepPipeline.from_pretrained(export_pipeline(pipe, tmp_path / "latent"))
    assert torch.equal(loaded(batch_size=2, generator=seeded(), output_type="pt").images, images)


# --- the teacher's multi-step sampler -------------------------------------------------------------------------------
def ddim(**overrides) -> DDIMScheduler:
    return DDIMScheduler.from_config(scheduler().config, clip_sample=False, **overrides)


@torch.no_grad()
def manual_ddim(unet, labels, steps, scale, seed):
    """Reference loop: separate conditional / null-class passes, x̂ = x̂_u + s (x̂_c − x̂_u)."""
    sched = ddim()
    sched.set_timesteps(steps)
    x = torch.randn((len(labels), 1, 8, 8), generator=seeded(seed))
    for t in sched.timesteps:
        out = unet(x, t, class_labels=labels).sample
        if scale is not None:
            uncond = unet(x, t, class_labels=torch.full_like(labels, NUM_CLASSES)).sample
            out = uncond + scale * (out - uncond)
        x = sched.step(out, t, x).prev_sample
    return to_unit(x)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_teacher_pipeline_guidance(unet, scale):
    teacher = ClassConditionalDiffusionPipeline(unet, ddim())
    labels = torch.tensor([0, 4, 9])
    images = teacher(class_labels=labels, num_inference_steps=3, guidance_scale=scale, generator=seeded(2),
                     output_type="pt").images
    expected = manual_ddim(unet, labels, 3, None if scale == 1.0 else scale, seed=2)
    assert torch.allclose(images, expected, atol=1e-5)


def test_teacher_ztsnr_trailing_ddim_one_step_equals_one_step_read_out(unet):
    sched = ddim(timestep_spacing="trailing")
    teacher = ClassConditionalDiffusionPipeline(unet, sched)
    images = teacher(class_labels=[2, 5], num_inference_steps=1, generator=seeded(), output_type="pt").images
    assert sched.timesteps.tolist() == [999]
    one_step = OneStepPipeline(unet, sched)(class_labels=[2, 5], generator=seeded(), output_type="pt").images
    assert torch.isfinite(images).all() and torch.allclose(images, one_step, atol=1e-6)


def test_teacher_pipeline_ddpm_seeded_is_deterministic(unet):
    teacher = ClassConditionalDiffusionPipeline(unet, scheduler())
    run = [teacher(batch_size=2, num_inference_steps=2, guidance_scale=1.5, generator=seeded(3), output_type="np")
           for _ in range(2)]
    assert np.array_equal(run[0].images, run[1].images)


# --- export and the three load ways ---------------------------------------------------------------------------------
PLAIN_DIFFUSERS = textwrap.dedent("""
    import sys
    sys.modules["onestep"] = None  # onestep is not installed here
    try:
        import onestep.pipelines
    except ImportError:
        pass
    else:
        raise SystemExit("onestep importable")
    import numpy as np, torch
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # as in the parent process, for bitwise-equal outputs
    from diffusers import DiffusionPipeline
    one, teacher, out, resaved = sys.argv[1:]
    pipe = DiffusionPipeline.from_pretrained(one, custom_pipeline="pipeline_onestep", trust_remote_code=True)
    pipe.save_pretrained(resaved)  # diffusers' save_pretrained of the dynamically loaded class keeps its file
    again = DiffusionPipeline.from_pretrained(resaved, custom_pipeline="pipeline_onestep", trust_remote_code=True)
    plain = DiffusionPipeline.from_pretrained(teacher, custom_pipeline="pipeline_class_conditional",
                                              trust_remote_code=True)
    assert type(pipe).__module__.startswith("diffusers_modules"), type(pipe).__module__
    one_images = pipe(class_labels=[1, 8], generator=torch.Generator().manual_seed(0), output_type="np").images
    teacher_images = plain(class_labels=[1, 8], num_inference_steps=2, guidance_scale=2.0,
                           generator=torch.Generator().manual_seed(0), output_type="np").images
    again_images = again(class_labels=[1, 8], generator=torch.Generator().manual_seed(0), output_type="np").images
    np.savez(out, one=one_images, teacher=teacher_images, again=again_images)
""")


def test_export_loads_three_ways(tmp_path, pipe, unet):
    folder = export_pipeline(pipe, tmp_path / "one")
    teacher_folder = export_pipeline(ClassConditionalDiffusionPipeline(unet, ddim()), tmp_path / "teacher")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "OneStepPipeline" and index["timesteps"] == [999]
    assert (folder / "pipeline_onestep.py").is_file() and (teacher_folder / "pipeline_class_conditional.py").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.rglob("*.bin"))

    loaded = OneStepPipeline.from_pretrained(folder)  # (a)
    expected = pipe(class_labels=[1, 8], generator=seeded(), output_type="np").images
    assert type(loaded) is OneStepPipeline and loaded.config.num_classes == NUM_CLASSES
    assert np.array_equal(loaded(class_labels=[1, 8], generator=seeded(), output_type="np").images, expected)

    generator_unet = UNet2DModel.from_pretrained(folder, subfolder="unet")  # (c)
    assert all(torch.equal(a, b) for a, b in zip(generator_unet.state_dict().values(), unet.state_dict().values(),
                                                  strict=True))

    script, out = tmp_path / "plain.py", tmp_path / "plain.npz"  # (b), in a process where onestep cannot import
    script.write_text(PLAIN_DIFFUSERS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    resaved = tmp_path / "resaved"
    result = subprocess.run([sys.executable, str(script), str(folder), str(teacher_folder), str(out), str(resaved)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    plain = np.load(out)
    assert np.array_equal(plain["one"], expected) and np.array_equal(plain["again"], expected)
    assert (resaved / "pipeline_onestep.py").read_text() == (folder / "pipeline_onestep.py").read_text()
    reloaded = OneStepPipeline.from_pretrained(resaved)  # the re-saved folder loads with onestep too
    assert np.array_equal(reloaded(class_labels=[1, 8], generator=seeded(), output_type="np").images, expected)
    teacher_images = ClassConditionalDiffusionPipeline.from_pretrained(teacher_folder)(
        class_labels=[1, 8], num_inference_steps=2, guidance_scale=2.0, generator=seeded(), output_type="np").images
    assert np.array_equal(plain["teacher"], teacher_images)


def test_export_replaces_atomically(tmp_path, pipe, unet, monkeypatch):
    out = tmp_path / "p"
    export_pipeline(pipe, out)
    export_pipeline(OneStepPipeline(unet, scheduler(), timesteps=[999, 500]), out)
    assert json.loads((out / "model_index.json").read_text())["timesteps"] == [999, 500]

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(OneStepPipeline, "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        export_pipeline(pipe, out)
    assert json.loads((out / "model_index.json").read_text())["timesteps"] == [999, 500]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary folders left behind


@torch.no_grad()
def test_export_generator_matches_training_time_sampling(tmp_path, unet):
    teacher = Teacher(unet, scheduler())
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, timesteps=(999, 400)).eval()
    pipe = OneStepPipeline.from_pretrained(export_generator(generator, teacher, tmp_path / "g"))
    labels = torch.tensor([0, 3, 6])
    images = pipe(class_labels=labels, generator=seeded(4), output_type="pt").images
    g = seeded(4)
    noise = torch.randn((3, 1, 8, 8), generator=g)
    expected = generator.sample(noise, teacher.condition(labels), generator=g)
    assert pipe.config.timesteps == [999, 400] and torch.allclose(images, to_unit(expected), atol=1e-6)
