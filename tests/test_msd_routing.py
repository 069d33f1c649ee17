"""Multi-Student Distillation: routers, the multi-student pipeline, and its export loading three ways."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from onestep.export.pipeline import export_students
from onestep.models.routing import ClassMappingRouter, ClassRangeRouter, TextPCARouter, pool, router_from_config
from onestep.models.teacher import Teacher
from onestep.pipelines import MultiStudentPipeline, OneStepPipeline
from onestep.pipelines.pipeline_multi_student import route_requests
from tests.conftest import scheduler, tiny_clip, tiny_text_unet, tiny_unet


NUM_CLASSES = 10
MIXED_LABELS = [9, 0, 5, 3, 7, 1, 8, 2, 6, 4, 0, 9]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def narrow_unet(seed: int) -> UNet2DModel:
    """A channel-reduced student without attention: students need not share the teacher's architecture."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       num_class_embeds=NUM_CLASSES + 1)


def students(k: int) -> list[UNet2DModel]:
    """k class-conditional students with different weights, the last one smaller than the others."""
    return [tiny_unet(NUM_CLASSES, seed=i).eval() for i in range(k - 1)] + [narrow_unet(seed=k).eval()]


def slices(router) -> list[list[int]]:
    return [router.classes_of(k) for k in range(router.num_students)]


def text_router() -> TextPCARouter:
    return TextPCARouter.fit(torch.randn(64, 16, generator=seeded(1)), 4)


# --- class routers --------------------------------------------------------------------------------------------------
def test_class_range_formula_gives_consecutive_slices():
    router = ClassRangeRouter(NUM_CLASSES, 4)
    assert slices(router) == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]
    labels = torch.arange(NUM_CLASSES)
    assert torch.equal(router.route(labels), labels * 4 // NUM_CLASSES)


@pytest.mark.parametrize(("num_classes", "num_students"), [(10, 1), (10, 3), (10, 10), (7, 4), (1000, 8)])
def test_class_range_slices_are_disjoint_and_cover(num_classes, num_students):
    router = ClassRangeRouter(num_classes, num_students)
    parts = slices(router)
    assert all(parts) and sorted(c for part in parts for c in part) == list(range(num_classes))
    routed = router.route(torch.arange(num_classes))
    assert all((routed[part] == k).all() for k, part in enumerate(parts))


def test_class_mapping_router_list_and_dict_agree():
    mapping = [1, 0, 2, 1, 0, 2, 2, 1, 0, 1]
    router = ClassMappingRouter(mapping, 3)
    assert slices(router) == [[1, 4, 8], [0, 3, 7, 9], [2, 5, 6]]
    assert torch.equal(router.route(torch.tensor([2, 0, 9])), torch.tensor([2, 1, 1]))
    assert ClassMappingRouter(dict(enumerate(mapping)), 3).to_config() == router.to_config()


@pytest.mark.parametrize(("mapping", "num_students", "message"), [
    ({0: 0, 2: 1}, 2, "without gaps"),
    ([0, 1, 2], 2, r"in \[0, 2\)"),
    ([0, -1], 2, r"in \[0, 2\)"),
    ([0, 0, 2], 3, "students \\[1\\] have none"),
    ([], 1, "at least one class"),
])
def test_class_mapping_validation(mapping, num_students, message):
    with pytest.raises(ValueError, match=message):
        ClassMappingRouter(mapping, num_students)


@pytest.mark.parametrize("router", [ClassRangeRouter(NUM_CLASSES, 4), ClassMappingRouter([0, 1] * 5, 2)])
@pytest.mark.parametrize("labels", [torch.tensor([NUM_CLASSES]), torch.tensor([0, -1]), torch.tensor([1.0]), None])
def test_class_routers_reject_bad_labels(router, labels):
    with pytest.raises(ValueError):
        router.route(labels)


def test_class_range_needs_a_class_per_student():
    with pytest.raises(ValueError, match="num_students <= num_classes"):
        ClassRangeRouter(3, 4)


# --- text router ----------------------------------------------------------------------------------------------------
def test_text_pca_router_halves_every_principal_component():
    pooled = torch.randn(64, 16, generator=seeded(1))
    router = text_router()
    routed = router.route(prompt_embeds=pooled)
    # Median thresholds halve the prompts along each component exactly, which forces quarters (a, b, b, a) with
    # a + b = 32; the components are uncorrelated, not independent, so a = b = 16 is not guaranteed (here 14, 18).
    assert [int(((routed >> b) & 1).sum()) for b in range(2)] == [32, 32]
    counts = torch.bincount(routed, minlength=4).tolist()
    assert sorted(counts) == [14, 14, 18, 18] and counts[0] == counts[3] and counts[1] == counts[2]
    centered = pooled.double() - pooled.double().mean(0)
    top = torch.linalg.eigvalsh(centered.T @ centered).flip(0)[:2]  # the components are the top-2 PCA directions
    rayleigh = torch.einsum("bd,de,be->b", router.components, centered.T @ centered, router.components)
    assert torch.allclose(rayleigh, top) and torch.allclose(router.components @ router.components.T,
                                                            torch.eye(2, dtype=torch.float64))


def test_text_pca_router_pools_tokens_by_mean():
    router = text_router()
    embeds = torch.randn(8, 5, 16, generator=seeded(2))
    assert torch.equal(pool(embeds), embeds.double().mean(dim=1))
    assert torch.equal(router.route(prompt_embeds=embeds), router.route(prompt_embeds=embeds.mean(dim=1).double()))


@pytest.mark.parametrize("num_students", [0, 3, 6])
def test_text_pca_router_needs_power_of_two_students(num_students):
    with pytest.raises(ValueError, match="power-of-2"):
        TextPCARouter.fit(torch.randn(64, 16), num_students)


def test_text_pca_router_with_one_student_routes_everything_to_it():
    router = router_from_config(json.loads(json.dumps(TextPCARouter.fit(torch.randn(8, 16), 1).to_config())))
    assert router.num_students == 1 and torch.equal(router.route(prompt_embeds=torch.randn(3, 16)), torch.zeros(3))


# --- config round trips and the pipeline file's evaluation ----------------------------------------------------------
ROUTERS = {"class_range": lambda: ClassRangeRouter(NUM_CLASSES, 3),
           "class_mapping": lambda: ClassMappingRouter([2, 0, 1, 1, 0, 2, 2, 0, 1, 0], 3),
           "text_pca": text_router}


@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_router_config_round_trip_and_pipeline_file_route_identically(kind):
    router = ROUTERS[kind]()
    config = json.loads(json.dumps(router.to_config()))
    loaded = router_from_config(config)
    assert config["type"] == kind and type(loaded) is type(router) and loaded.to_config() == router.to_config()
    labels = torch.arange(NUM_CLASSES).repeat(3)
    embeds = torch.randn(200, 7, 16, generator=seeded(3))
    inputs = {"class_labels": labels} if kind.startswith("class") else {"prompt_embeds": embeds}
    expected = router.route(**inputs)
    assert torch.equal(loaded.route(**inputs), expected)
    assert torch.equal(route_requests(config, inputs.get("class_labels"), inputs.get("prompt_embeds")), expected)
    if kind == "text_pca":
        assert all(torch.equal(getattr(loaded, k), getattr(router, k)) for k in ("mean", "components", "thresholds"))


def test_unknown_router_type_raises():
    with pytest.raises(ValueError, match="unknown router type"):
        router_from_config({"type": "kmeans"})


# --- the pipeline ---------------------------------------------------------------------------------------------------
def per_request(seeds) -> list[torch.Generator]:
    """One generator per request: a request's noise then depends on nothing else in the batch."""
    return [seeded(100 + int(i)) for i in seeds]


@torch.no_grad()
@pytest.mark.parametrize(("num_students", "timesteps"), [(2, [999]), (3, [999, 500]), (4, [999])])
def test_mixed_batch_equals_per_student_pipelines(num_students, timesteps):
    unets, sched = students(num_students), scheduler(zero_snr=False)
    router = ClassRangeRouter(NUM_CLASSES, num_students)
    pipe = MultiStudentPipeline.from_students(unets, sched, router=router.to_config(), timesteps=timesteps)
    labels = torch.tensor(MIXED_LABELS)
    images = pipe(class_labels=labels, generator=per_request(range(12)), output_type="pt").images
    routed = router.route(labels)
    assert sorted(set(routed.tolist())) == list(range(num_students)) and images.shape == (12, 1, 8, 8)
    for k, unet in enumerate(unets):
        rows = (routed == k).nonzero().flatten()
        single = OneStepPipeline(unet, sched, timesteps=timesteps)
        expected = single(class_labels=labels[rows], generator=per_request(rows), output_type="pt").images
        assert torch.equal(images[rows], expected)


@torch.no_grad()
def test_one_seeded_generator_draws_noise_over_the_whole_batch_in_request_order():
    """Request i gets row i of the full-batch noise, as from `OneStepPipeline` on the whole batch.

    Equal up to float32 rounding only: a UNet's output for one sample can differ in the last bit with the batch
    size (matmul blocking), and each student runs on its own requests only.
    """
    unets, sched, timesteps = students(3), scheduler(zero_snr=False), [999, 500]
    router = ClassRangeRouter(NUM_CLASSES, 3)
    pipe = MultiStudentPipeline.from_students(unets, sched, router=router.to_config(), timesteps=timesteps)
    images = pipe(class_labels=MIXED_LABELS, generator=seeded(3), output_type="pt").images
    routed = router.route(torch.tensor(MIXED_LABELS))
    for k, unet in enumerate(unets):
        single = OneStepPipeline(unet, sched, timesteps=timesteps)
        expected = single(class_labels=MIXED_LABELS, generator=seeded(3), output_type="pt").images
        assert torch.allclose(images[routed == k], expected[routed == k], atol=1e-6, rtol=0)


def test_pipeline_rejects_inconsistent_parts():
    sched, config = scheduler(), ClassRangeRouter(NUM_CLASSES, 2).to_config()
    with pytest.raises(ValueError, match="router is for 2 students"):
        MultiStudentPipeline.from_students(students(3), sched, router=config)
    with pytest.raises(ValueError, match="splits 5 classes"):
        MultiStudentPipeline.from_students(students(2), sched, router=ClassRangeRouter(5, 2).to_config())
    with pytest.raises(ValueError, match="without gaps"):
        MultiStudentPipeline(sched, unet_0=tiny_unet(NUM_CLASSES), unet_2=tiny_unet(NUM_CLASSES), router=config)
    with pytest.raises(ValueError, match="one sample shape"):
        MultiStudentPipeline.from_students([tiny_unet(NUM_CLASSES), tiny_unet(NUM_CLASSES, size=16)], sched,
                                           router=config)
    with pytest.raises(ValueError, match="1 to 8 students"):
        MultiStudentPipeline.from_students([tiny_unet(NUM_CLASSES)] * 9, sched, router=config)
    with pytest.raises(ValueError, match="needs a router"):
        MultiStudentPipeline(sched, unet_0=tiny_unet(NUM_CLASSES))


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
    folder, out, labels = sys.argv[1], sys.argv[2], [int(c) for c in sys.argv[3].split(",")]
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_multi_student", trust_remote_code=True)
    assert type(pipe).__module__.startswith("diffusers_modules"), type(pipe).__module__
    images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.savez(out, images=images, routed=pipe.route(torch.tensor(labels)).numpy())
""")


def test_export_loads_three_ways(tmp_path):
    unets, timesteps = students(3), [999, 400]
    router = ClassRangeRouter(NUM_CLASSES, 3)
    teacher = Teacher(tiny_unet(NUM_CLASSES), scheduler())
    folder = export_students(unets, teacher, router, timesteps, tmp_path / "msd")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "MultiStudentPipeline" and index["router"] == router.to_config()
    assert index["timesteps"] == timesteps and index["unet_2"] == ["diffusers", "UNet2DModel"]
    assert index["unet_3"] == [None, None] and (folder / "pipeline_multi_student.py").is_file()
    assert len(list(folder.rglob("*.safetensors"))) == 3 and not list(folder.rglob("*.bin"))

    pipe = MultiStudentPipeline.from_students(unets, teacher.scheduler, router=router.to_config(),
                                              timesteps=timesteps)
    expected = pipe(class_labels=MIXED_LABELS, generator=seeded(), output_type="np").images
    loaded = MultiStudentPipeline.from_pretrained(folder)  # (a)
    assert type(loaded) is MultiStudentPipeline and len(loaded.students) == 3
    assert np.array_equal(loaded(class_labels=MIXED_LABELS, generator=seeded(), output_type="np").images, expected)
    labels = torch.arange(NUM_CLASSES)
    assert torch.equal(loaded.route(labels), router.route(labels))

    for k, unet in enumerate(unets):  # (c)
        alone = UNet2DModel.from_pretrained(folder, subfolder=f"unet_{k}")
        assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), unet.state_dict().values(),
                                                      strict=True))

    script, out = tmp_path / "plain.py", tmp_path / "plain.npz"  # (b), in a process where onestep cannot import
    script.write_text(PLAIN_DIFFUSERS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    args = [str(folder), str(out), ",".join(map(str, MIXED_LABELS))]
    result = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    plain = np.load(out)
    assert np.array_equal(plain["images"], expected)
    assert np.array_equal(plain["routed"], router.route(torch.tensor(MIXED_LABELS)).numpy())


@torch.no_grad()
def test_text_students_route_as_fitted_after_save_and_load(tmp_path):
    encoder, tokenizer = tiny_clip(tmp_path)
    sched = scheduler("epsilon", zero_snr=False)
    teacher = Teacher(tiny_text_unet(), sched, text_encoder=encoder, tokenizer=tokenizer)
    letters = "abcdefghijklmnopqrstuvwxyz"
    prompts = [f"{letters[i % 26]}{letters[(7 * i) % 26]} {'cat' if i % 2 else 'dog'}" for i in range(16)]
    embeds = teacher.encode_prompts(prompts).encoder_hidden_states
    router = TextPCARouter.fit(pool(embeds), 4)
    routed = router.route(prompt_embeds=embeds)
    assert sorted(set(routed.tolist())) == [0, 1, 2, 3]

    unets = [tiny_text_unet(seed=k).eval() for k in range(4)]
    loaded = MultiStudentPipeline.from_pretrained(export_students(unets, teacher, router, [999], tmp_path / "t"))
    assert torch.equal(loaded.route(prompt_embeds=loaded.encode_prompt(prompts)[0]), routed)
    images = loaded(prompt=prompts, generator=per_request(range(16)), output_type="pt").images
    for k, unet in enumerate(unets):
        rows = (routed == k).nonzero().flatten()
        single = OneStepPipeline(unet, sched, text_encoder=encoder, tokenizer=tokenizer)
        expected = single(prompt=[prompts[i] for i in rows], generator=per_request(rows), output_type="pt").images
        assert torch.equal(images[rows], expected)
