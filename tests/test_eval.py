"""onestep.eval: quantisation, FD-digits through torchmetrics (checked against a direct formula), the Inception
error path, the shipped classifier, balanced labels, grids and image-folder references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from onestep.data.digits import load_digits_tensors, split_halves
from onestep.eval import (
    DigitsFeatures,
    EvalError,
    balanced_labels,
    class_shares,
    compute_stats,
    frechet_distance,
    load_digits_classifier,
    load_stats,
    max_share_error,
    real_vs_real_floor,
    save_grid,
    save_stats,
    to_uint8,
    uint8_to_float,
)
from onestep.eval.features import INCEPTION_SAFETENSORS_NAME
from onestep.eval.forgetting import forgetting_report, unlearning_accuracy


@pytest.fixture(scope="module")
def digits():
    """(uint8 images, labels, first-half index, second-half index)."""
    images, labels = load_digits_tensors()
    first, second = split_halves(labels.numpy(), seed=0)
    return to_uint8(images), labels, torch.from_numpy(first), torch.from_numpy(second)


def direct_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Textbook Fréchet distance of classifier features with numpy / scipy.linalg.sqrtm."""
    with torch.no_grad():
        fa, fb = (DigitsFeatures()(x).double().numpy() for x in (a, b))
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sigma_a, sigma_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-1.0, 0.999, 1.0, 1.02, 1.5, -0.01 * 2 - 1, -3.0, 0.0])
    assert to_uint8(x).tolist() == [0, 255, 255, 255, 255, 0, 0, 128]
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(uint8_to_float(levels)), levels)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))


def test_fd_of_a_set_with_itself_is_zero(digits):
    images = digits[0]
    result = frechet_distance(images, reference="digits")
    assert abs(result.value) < 1e-6
    assert result.protocol == {"metric": "FD-digits", "features": "digits", "reference": "digits",
                               "num_samples": 1797, "num_reference": 1797, "dtype": "float64",
                               "extractor": "digits classifier penultimate layer (64-d)", "resize": "none (8x8 input)"}
    assert json.loads(json.dumps(result.to_dict()))["value"] == result.value


def test_npz_reference_matches_direct_formula(digits, tmp_path):
    images, _, first, second = digits
    stats = compute_stats(images[second])
    path = save_stats(stats, tmp_path / "half.npz")
    loaded = load_stats(path, features="digits")
    assert loaded.num_samples == len(second) and loaded.features == "digits"
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)

    from_npz = frechet_distance(images[first], reference=path)
    floor = real_vs_real_floor(seed=0)
    assert from_npz.protocol["num_reference"] == len(second)
    assert from_npz.value == pytest.approx(floor.value, rel=1e-9)
    assert from_npz.value == pytest.approx(direct_fd(images[first], images[second]), rel=1e-4)
    with pytest.raises(EvalError, match="digits statistics"):
        load_stats(path, features="inception")


def test_noise_is_far_from_digits(digits):
    noise = torch.randint(0, 256, (500, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    classifier = load_digits_classifier()
    result = real_vs_real_floor(seed=0, classifier=classifier)
    floor = result.value
    assert 0 < floor < 10
    assert result.protocol["features"] != real_vs_real_floor(seed=0).protocol["features"]  # not the shipped one
    assert next(classifier.parameters()).dtype == torch.float32  # the metric's float64 cast touched a copy only
    assert frechet_distance(noise).value > 50 * floor


def test_digits_features_reject_wrong_inputs(digits):
    with pytest.raises(EvalError, match="uint8"):
        frechet_distance(uint8_to_float(digits[0][:10]))
    with pytest.raises(EvalError, match=r"\(N, 1, 8, 8\)"):
        frechet_distance(torch.zeros(4, 3, 8, 8, dtype=torch.uint8))


def test_inception_without_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(EvalError) as err:
        frechet_distance(images, features="inception")
    message = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_SAFETENSORS_NAME) in message
    assert "convert_inception_weights.py" in message and "\n" not in message
    assert not (tmp_path / "torch").exists()  # nothing downloaded

    with pytest.raises(EvalError, match=str(tmp_path / "mine.pth")):
        frechet_distance(images, features="inception", inception_weights=tmp_path / "mine.pth")


def test_cli_inception_error_exits_2(tmp_path, monkeypatch, capsys):
    from onestep.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    np.savez(tmp_path / "samples.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    assert main(["fid", str(tmp_path / "samples.npz"), "--features", "inception"]) == 2
    assert INCEPTION_SAFETENSORS_NAME in capsys.readouterr().err


def test_shipped_classifier_accuracy_and_shares(digits):
    images, labels, _, second = digits
    classifier = load_digits_classifier()
    assert not classifier.training and not any(p.requires_grad for p in classifier.parameters())
    with torch.no_grad():
        logits = classifier(uint8_to_float(images[second]))
        features = classifier.features(uint8_to_float(images[:5]))
    assert (logits.argmax(1) == labels[second]).float().mean() >= 0.97
    assert features.shape == (5, 64)

    shares = class_shares(images[second], classifier)
    truth = np.bincount(labels[second].numpy(), minlength=10) / len(second)
    assert shares.sum() == pytest.approx(1.0)
    assert max_share_error(shares, truth) < 0.02
    assert max_share_error(np.full(10, 0.1), 0.1) == 0.0


def test_balanced_labels():
    labels = balanced_labels(23, 10)
    assert labels.dtype == torch.long
    assert torch.bincount(labels, minlength=10).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert torch.equal(labels, balanced_labels(23, 10))
    assert torch.bincount(balanced_labels(1000, 10)).tolist() == [100] * 10
    assert balanced_labels(0, 3).numel() == 0


def test_save_grid_size(tmp_path, digits):
    path = save_grid(digits[0][:12], tmp_path / "sub" / "grid.png", nrow=5, scale=4, padding=2)
    with Image.open(path) as img:
        assert img.size == (5 * (32 + 2) + 2, 3 * (32 + 2) + 2) and img.mode == "L"
    rgb = np.zeros((3, 16, 16, 3), np.uint8)
    with Image.open(save_grid(rgb, tmp_path / "rgb.png")) as img:
        assert img.size == (2 * (64 + 2) + 2, 2 * (64 + 2) + 2) and img.mode == "RGB"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["grid.png", "rgb.png"]


def test_image_folder_reference(digits, tmp_path):
    images, _, first, second = digits
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, image in enumerate(images[second[:200]]):
        Image.fromarray(image[0].numpy()).save(folder / f"{i:04d}.png")
    from_folder = frechet_distance(images[first], reference=folder)
    save_stats(compute_stats(images[second[:200]]), tmp_path / "ref.npz")
    assert from_folder.value == pytest.approx(frechet_distance(images[first], reference=tmp_path / "ref.npz").value)
    assert from_folder.protocol["num_reference"] == 200

    Image.fromarray(np.zeros((8, 9), np.uint8)).save(folder / "zz_wide.png")
    with pytest.raises(EvalError, match="zz_wide.png"):
        frechet_distance(images[first], reference=folder)
    with pytest.raises(EvalError, match="none of these"):
        frechet_distance(images[first], reference=tmp_path / "missing")


def _real_digit_sampler(images: torch.Tensor, labels: torch.Tensor, answer_forgotten_with: int | None = None):
    """A stand-in sampler returning real digits of each requested class (optionally answering 0 with a 5)."""
    pools = {c: images[labels == c] for c in range(10)}

    def sample(requested: torch.Tensor) -> torch.Tensor:
        out = []
        for i, c in enumerate(requested.tolist()):
            c = answer_forgotten_with if c == 0 and answer_forgotten_with is not None else c
            out.append(pools[c][i % len(pools[c])])
        return torch.stack(out)

    return sample


def test_unlearning_accuracy_divides_by_forget_class_samples(digits):
    images, labels, _, _ = digits
    classifier = load_digits_classifier()
    zeros, ones = images[labels == 0], images[labels == 1]
    assert unlearning_accuracy(zeros, classifier, 0) <= 0.02  # real zeros: nearly all still classified as 0
    assert unlearning_accuracy(ones, classifier, 0) >= 0.98  # ones asked for as 0: forgotten
    mixed = torch.cat([zeros[:30], ones[:10]])
    expected = float((classifier(uint8_to_float(mixed)).argmax(1) != 0).float().mean())
    assert unlearning_accuracy(mixed, classifier, 0) == pytest.approx(expected)
    assert 0.2 <= expected <= 0.3  # 10 of 40, up to classifier errors
    with pytest.raises(ValueError):
        unlearning_accuracy(images[:0], classifier, 0)


def test_forgetting_report_tells_a_forgetting_sampler_from_a_faithful_one(digits):
    images, labels, _, _ = digits
    faithful = forgetting_report(_real_digit_sampler(images, labels), 10, [0], 500)
    forgetful = forgetting_report(_real_digit_sampler(images, labels, answer_forgotten_with=5), 10, [0], 500)
    assert faithful["classified_as_forgotten/class_0"] >= 0.95
    assert forgetful["classified_as_forgotten/class_0"] <= 0.02
    assert forgetful["unlearning_accuracy/class_0"] == pytest.approx(1 - forgetful["classified_as_forgotten/class_0"])
    # the remaining classes are real digits of those classes: near the real-vs-real floor, same for both samplers
    remaining = faithful["fd_digits/remaining_classes"]
    assert remaining == forgetful["fd_digits/remaining_classes"] < 2 * real_vs_real_floor().value
    with pytest.raises(EvalError, match="does not exist"):
        forgetting_report(_real_digit_sampler(images, labels), 10, [10], 500)
