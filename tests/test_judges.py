"""The second digits judge ("digits_mlp"): a registered feature network and classifier, deterministic, not the first
judge's network, separating real digits from degraded ones, and used for forgetting when asked for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from onestep.data.digits import load_digits_tensors, split_halves
from onestep.eval import DigitsFeatures, EvalError, compute_stats, frechet_distance, save_stats, to_uint8
from onestep.eval.classifier import DIGITS_JUDGES, load_judge
from onestep.eval.forgetting import forgetting_report
from onestep.eval.quantize import uint8_to_float


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits_tensors()
    return images, labels


def shifted(images: torch.Tensor, pixels: int = 2) -> torch.Tensor:
    return torch.roll(images, pixels, dims=3)


def test_judges_are_two_different_networks_with_different_errors(digits):
    images, labels = digits
    cnn, mlp = load_judge("digits"), load_judge("digits_mlp")
    assert cnn.config.architecture == "cnn" and mlp.config.architecture == "mlp"
    assert not any(isinstance(m, torch.nn.Conv2d) for m in mlp.modules())
    x = images[:200]
    with torch.no_grad():
        a, b = DigitsFeatures(judge="digits_mlp")(to_uint8(x)), DigitsFeatures(judge="digits_mlp")(to_uint8(x))
        assert torch.equal(a, b)  # deterministic: eval mode, no dropout at evaluation
        assert torch.allclose(a, mlp.features(uint8_to_float(to_uint8(x))))
        assert not torch.allclose(a, cnn.features(uint8_to_float(to_uint8(x))), atol=1e-2)
        wrong_cnn, wrong_mlp = cnn(images).argmax(1) != labels, mlp(images).argmax(1) != labels
    assert wrong_mlp.float().mean() < 0.02  # both classify real digits; their mistakes are not the same ones
    assert (wrong_cnn & wrong_mlp).sum() < 0.5 * min(wrong_cnn.sum(), wrong_mlp.sum())
    _, held_out = split_halves(labels.numpy(), seed=1)  # the MLP's held-out half (it trained on the other)
    with torch.no_grad():
        assert (mlp(images[held_out]).argmax(1) == labels[held_out]).float().mean() >= 0.97
    with pytest.raises(EvalError, match="no digits classifier"):
        load_judge("inception")


def direct_fd(features: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> float:
    with torch.no_grad():
        fa, fb = (features(x).double().numpy() for x in (a, b))
    sa, sb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    return float(((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb)
                 - 2 * np.trace(scipy.linalg.sqrtm(sa @ sb).real))


def test_judge2_fd_is_small_on_held_out_real_digits_and_large_on_degraded_ones(digits, tmp_path):
    images, labels = digits
    first, second = split_halves(labels.numpy(), seed=0)
    real, held_out = to_uint8(images[first]), to_uint8(images[second])
    reference = save_stats(compute_stats(held_out, features="digits_mlp"), tmp_path / "held_out.npz")
    floor = frechet_distance(real, reference=reference, features="digits_mlp")
    assert floor.protocol["metric"] == "FD-digits_mlp" and "MLP" in floor.protocol["extractor"]
    assert floor.value == pytest.approx(direct_fd(DigitsFeatures(judge="digits_mlp"), real, held_out), rel=1e-4)
    judge1 = save_stats(compute_stats(held_out), tmp_path / "judge1.npz")
    assert floor.value != pytest.approx(frechet_distance(real, reference=judge1).value, rel=0.05)
    x = images[first]
    blurred = F.avg_pool2d(F.pad(x, [1] * 4, mode="replicate"), 3, 1)
    noised = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    for degraded in (blurred, noised, shifted(x, 1)):
        assert frechet_distance(to_uint8(degraded), reference=reference, features="digits_mlp").value > 3 * floor.value
    with pytest.raises(EvalError, match=r"digits_mlp features need \(N, 1, 8, 8\)"):
        frechet_distance(torch.zeros(4, 1, 16, 16, dtype=torch.uint8), features="digits_mlp")


def test_forgetting_on_judge2_counts_with_judge2s_classifier(digits):
    images, labels = digits
    pools = {c: to_uint8(images[labels == c]) for c in range(10)}
    pools[0] = to_uint8(shifted(images[labels == 0]))  # zeros moved 2 px right: the two judges disagree on them

    def sample(requested: torch.Tensor) -> torch.Tensor:
        return torch.stack([pools[int(c)][i % len(pools[int(c)])] for i, c in enumerate(requested)])

    reports = {judge: forgetting_report(sample, 10, [0], 500, features=judge, metric=f"fd_{judge}",
                                        classifier=judge) for judge in DIGITS_JUDGES}
    asked = sample(torch.zeros(50, dtype=torch.long))
    for judge, report in reports.items():
        with torch.no_grad():
            direct = float((load_judge(judge)(uint8_to_float(asked)).argmax(1) == 0).float().mean())
        assert report["classified_as_forgotten/class_0"] == pytest.approx(direct)
        assert report["unlearning_accuracy/class_0"] == pytest.approx(1 - direct)
        assert report[f"fd_{judge}/remaining_classes"] > 0
    shares = [r["classified_as_forgotten/class_0"] for r in reports.values()]
    assert abs(shares[0] - shares[1]) > 0.3  # each judge's own classifier counted, not the first judge's twice
    assert reports["digits_mlp"]["fd_digits_mlp/remaining_classes"] != reports["digits"]["fd_digits/remaining_classes"]


def test_cli_fid_with_judge2(tmp_path, capsys, digits):
    from onestep.cli import main

    images, _ = digits
    np.savez(tmp_path / "s.npz", images=to_uint8(images[:300]).permute(0, 2, 3, 1).numpy())
    assert main(["fid", str(tmp_path / "s.npz"), "--features", "digits_mlp"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["protocol"]["metric"] == "FD-digits_mlp" and result["protocol"]["num_samples"] == 300
    assert result["value"] == pytest.approx(frechet_distance(to_uint8(images[:300]), features="digits_mlp").value)


def test_real_fake_probe_tells_apart_only_what_differs():
    from scripts.real_fake_probe import probe_accuracy

    real, _ = load_digits_tensors()
    shuffled = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))]
    assert probe_accuracy(real, real.flip(-1), sigma=0.0, steps=300) > 0.9  # mirrored digits: easy
    assert abs(probe_accuracy(real, shuffled, sigma=0.0, steps=300) - 0.5) < 0.08  # the same distribution: chance
    assert probe_accuracy(real, real.flip(-1), sigma=3.0, steps=300) < 0.65  # drowned in noise: near chance
