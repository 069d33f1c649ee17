"""Text-to-image evaluation: the judge of a text teacher's run (eval prompts, validation grid, CLIP score, a registered
metric), `onestep sample|fid --prompts`, and their bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from onestep.cli import main
from onestep.eval import features as feature_registry
from onestep.eval import metrics as metric_registry
from onestep.eval.metrics import CLIPScoreMetric, PerSampleMetric, SampleBatch
from tests.conftest import save_folder, scheduler, sd_folder, tiny_clip, tiny_text_unet, tiny_vae


PROMPTS = ["a cat", "dog", "cat dog"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SD1.5-shaped text teacher folder, a tiny CLIP model folder, a prompt file."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = tmp_path_factory.mktemp("text")
    encoder, tokenizer = tiny_clip(root)
    save_folder(root / "teacher", "StableDiffusionPipeline", unet=tiny_text_unet(),
                scheduler=scheduler("epsilon", zero_snr=False), vae=tiny_vae(), text_encoder=encoder,
                tokenizer=tokenizer)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=encoder.config.to_dict(), projection_dim=8,
                        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2))
    CLIPModel(config).save_pretrained(root / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "clip")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


class ColourFeatures(torch.nn.Module):
    """A registered feature network (the hook an evaluator uses): per-channel mean and std of the image."""

    num_features = 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.double() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


@pytest.fixture
def registered(monkeypatch):
    """`colours` features and a `prompt_length` per-sample metric that records the prompts it was shown."""
    seen: list[str] = []

    def score(batch: SampleBatch) -> torch.Tensor:
        seen.extend(batch.prompts)
        return torch.tensor([float(len(p)) for p in batch.prompts])

    monkeypatch.setitem(feature_registry.FEATURES, "colours",
                        feature_registry.FeatureSpec(lambda options: ColourFeatures(), 3,
                                                     lambda options: {"extractor": "colour moments"}))
    monkeypatch.setitem(metric_registry.METRICS, "prompt_length",
                        lambda ctx: PerSampleMetric("prompt_length", score, "characters per prompt"))
    return seen


def test_clip_score_equals_the_direct_formula(folders):
    from transformers import CLIPModel, CLIPProcessor

    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "dog", "a cat", "dog"]
    metric = CLIPScoreMetric(folders / "clip")
    metric.update(SampleBatch(images[:2], None, prompts[:2]))
    metric.update(SampleBatch(images[2:], None, prompts[2:]))

    model = CLIPModel.from_pretrained(folders / "clip").eval()
    processor = CLIPProcessor.from_pretrained(folders / "clip")
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = processor(text=prompts, return_tensors="pt", padding=True)
        text = model.text_projection(model.text_model(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"]).pooler_output)
    expected = max(100 * torch.nn.functional.cosine_similarity(image, text).mean().item(), 0.0)
    assert expected > 0 and metric.compute() == pytest.approx(expected, rel=1e-5)
    assert metric.protocol()["num_samples"] == 4
    with pytest.raises(ValueError, match="needs prompts"):
        metric.update(SampleBatch(images))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_text_teacher_run_is_judged_with_a_validation_grid(folders, registered, tmp_path, capsys, kind):
    config = tmp_path / "text.yaml"
    config.write_text(f"""
method: dmd2
output_dir: {tmp_path / 'run'}
teacher: {{path: {sd_folder(tmp_path / 'teacher', kind)}}}
data: {{name: prompts, prompts: {folders / 'prompts.txt'}, batch_size: 2}}
train: {{max_steps: 2, log_every: 1}}
eval:
  num_samples: 5
  sampling_batch: 2
  metrics: [clip_score, prompt_length]
  clip_model: {folders / 'clip'}
  validation_prompts: [a cat, dog]
options: {{gan: false, generator_every: 1}}
""")
    assert main(["train", str(config)]) == 0, capsys.readouterr().err
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    assert 0 <= final["clip_score/student"] <= 100
    # N=5 requests cycle over the 3 eval prompts: 2, 2, 1 of them
    assert final["prompt_length/student"] == pytest.approx(sum(map(len, PROMPTS + PROMPTS[:2])) / 5)
    assert registered[-5:] == PROMPTS + PROMPTS[:2]
    assert "3 eval prompts, cycled" in final["protocol"] and "fd" not in " ".join(final)  # no FD-digits of text
    with Image.open(tmp_path / "run" / "samples.png") as grid:  # a row per validation prompt, 16px images x4
        # each image with its prompt written under it (a 12-pixel line)
        assert grid.size == (2 * (64 + 2) + 2, 2 * (64 + 12 + 2) + 2) and grid.mode == "RGB"

    # the exported pipeline samples with prompts; `onestep fid` scores it with the same metric objects
    pipeline = tmp_path / "run" / "pipeline"
    assert main(["sample", str(pipeline), "--prompts", str(folders / "prompts.txt"), "--num-images", "4",
                 "--out", str(tmp_path / "s.npz"), "--seed", "3"]) == 0
    with np.load(tmp_path / "s.npz") as saved:
        assert list(saved["prompts"]) == PROMPTS + PROMPTS[:1] and saved["images"].shape == (4, 16, 16, 3)
        images = torch.from_numpy(saved["images"]).permute(0, 3, 1, 2)
    (tmp_path / "ref").mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(tmp_path / "ref" / f"{i}.png")
    capsys.readouterr()
    assert main(["fid", str(pipeline), "--prompts", str(folders / "prompts.txt"), "--num-samples", "4",
                 "--seed", "3", "--features", "colours", "--reference", str(tmp_path / "ref"),
                 "--metrics", "clip_score", "prompt_length", "--clip-model", str(folders / "clip")]) == 0
    result = json.loads(capsys.readouterr().out)
    from onestep.eval.fd import frechet_distance

    direct = frechet_distance(images, reference=tmp_path / "ref", features="colours")
    assert result["value"] == pytest.approx(direct.value, rel=1e-9)
    assert result["protocol"]["metric"] == "FD-colours" and result["protocol"]["seed"] == 3
    assert result["protocol"]["requests"].startswith("prompts from")
    assert result["protocol"]["image_size"] == [3, 16, 16]
    assert 0 <= result["clip_score"]["value"] <= 100
    assert result["prompt_length"]["value"] == pytest.approx(sum(map(len, PROMPTS + PROMPTS[:1])) / 4)


def test_teacher_folder_samples_with_prompts_and_bad_inputs_exit_2(folders, registered, tmp_path, capsys):
    out = tmp_path / "t.png"
    assert main(["sample", str(folders / "teacher"), "--prompts", str(folders / "prompts.txt"), "--steps", "2",
                 "--num-images", "3", "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    # --features none: the listed metrics only, on a teacher's K-step samples
    assert main(["fid", str(folders / "teacher"), "--prompts", str(folders / "prompts.txt"), "--steps", "2",
                 "--num-samples", "4", "--features", "none", "--metrics", "prompt_length"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "value" not in result and result["protocol"]["nfe"] == 2 and registered == PROMPTS + PROMPTS[:1]
    assert result["prompt_length"]["value"] == pytest.approx(sum(map(len, PROMPTS + PROMPTS[:1])) / 4)

    def one_line(argv, *words):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and all(w in err for w in words), err

    one_line(["sample", folders / "teacher", "--steps", "2", "--out", tmp_path / "x.png"], "--prompts")
    one_line(["sample", folders / "teacher", "--prompts", tmp_path / "missing.txt", "--out", tmp_path / "x.png"],
             "not found")
    one_line(["sample", "builtin:digits", "--prompts", folders / "prompts.txt", "--out", tmp_path / "x.png"],
             "does not take prompts")
    one_line(["fid", "builtin:digits", "--prompts", folders / "prompts.txt"], "does not take prompts")
    one_line(["fid", folders / "teacher", "--steps", "2", "--features", "nope"], "features must be one of")
    one_line(["fid", folders / "teacher", "--features", "none"], "--metrics")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("override, words", [
    ("eval.metrics=[clip_scor]", ["clip_scor", "clip_score"]),
    ("eval.metrics=[clip_score]", ["eval.clip_model"]),
    ("eval.validation_prompts=[a cat, '']", ["validation_prompts"]),
    ("eval.features=incepton", ["incepton", "inception"]),
    ("eval.validation_prompts=[a cat]", ["text-to-image", "class-conditional"]),  # the digits teacher takes none
    # what would only fail at the first evaluation (the end of a run) is caught before training
    ("eval.features=inception", ["Inception weights not found"]),
    ("eval.reference=/nonexistent/ref.npz", ["not found"]),
    ("eval.reference=/nonexistent/images", ["not found"]),
    ("eval.metrics=[clip_score]|eval.clip_model=/nonexistent/clip", ["CLIP model folder"]),
])
def test_bad_eval_configs_exit_2_before_training(tmp_path, capsys, monkeypatch, override, words):
    from tests.test_cli import DEMO

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights in the default place
    assert main(["train", str(DEMO), f"output_dir={tmp_path / 'out'}", *override.split("|")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_a_judge_without_metrics_draws_no_samples(text_teacher):
    from onestep.eval.judge import Judge

    judge = Judge(num_samples=1000, features=None, prompts=PROMPTS)

    class Refuses:
        def sample(self, *args, **kwargs):
            raise AssertionError("sampled with nothing to score")

    assert judge.generator_metrics(Refuses(), text_teacher) == {}
    assert judge.generator_grid(_OneStep(), text_teacher).shape == (9, 3, 16, 16)  # the grid still comes


class _OneStep:
    """Stands in for a generator: its 'sample' is the noise itself."""

    def sample(self, noise, condition, generator=None):
        return noise


def test_class_judge_states_the_full_protocol():
    from onestep.eval.judge import Judge

    judge = Judge(num_samples=20, num_classes=10, batch_size=8)
    before = judge.protocol
    judge.metrics("cpu")
    after = judge.protocol
    assert before.startswith("FD-digits: features digits, reference digits") and "class-balanced" in before
    assert "extractor digits classifier penultimate layer (64-d)" in after and "num_reference 1797" in after
    assert after.endswith("N=20 class-balanced samples from fixed noise (seed 1234)")


def test_judge_scores_forgotten_and_remaining_prompts_apart(text_teacher, registered):
    """SFD on a text teacher: every metric is reported on the forgotten eval prompts and on the rest, each scored on
    exactly those prompts."""
    from onestep.eval.judge import Judge

    judge = Judge(num_samples=6, features=None, prompts=PROMPTS * 2, metrics=["prompt_length"],
                  forget_prompts=["cat dog"], batch_size=4)
    out = judge.generator_metrics(_OneStep(), text_teacher)
    assert out["prompt_length/student"] == pytest.approx(sum(map(len, PROMPTS)) / 3)
    assert out["prompt_length/forget_prompts"] == len("cat dog") and out["num_forget_prompts"] == 2
    assert out["prompt_length/remaining_prompts"] == pytest.approx((len("a cat") + len("dog")) / 2)
    assert out["num_remaining_prompts"] == 4
    assert sorted(set(registered)) == sorted(PROMPTS) and len(registered) == 6 + 2 + 4
