"""Inception FID end to end through `onestep fid`, checked against torchmetrics' FrechetInceptionDistance computed
directly with the same network; the network against torch-fidelity's; weights files, statistics files, the cache."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchmetrics.image.fid import FrechetInceptionDistance

from onestep.cli import main
from onestep.eval.inception import FIDInceptionV3, load_inception


# sha256 of "key:shape;..." over torch-fidelity 0.4.0's FeatureExtractorInceptionV3 state dict (566 entries, 23,885,486
# numbers), computed from its source: our network must load the same weights files. (Its forward was also compared
# once on random weights and a 37x53 input: bit-identical features, as was its TF1 resize.)
TORCH_FIDELITY_STATE_DIGEST = "6b47c6f86df6dee8f2f6ca068ebb0e554d487009028b67a7642460fc08eba6fc"


@pytest.fixture(autouse=True)
def _onednn():
    """oneDNN on for the 299x299 Inception (tests turn it off for tiny models; here it is ~1.5x faster)."""
    before, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, True
    yield
    torch.backends.mkldnn.enabled = before


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A randomly initialised FID Inception (He-normal convolutions, random BatchNorm statistics so that features are
    neither vanishing nor degenerate), saved as safetensors and as a pickle."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    folder = tmp_path_factory.mktemp("inception")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, folder / "inception.safetensors")
    torch.save(state, folder / "inception.pth")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders of 3 RGB 16x16 images: smooth blobs (reference) and noisier ones (generated)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(16), np.arange(16), indexing="ij"), -1)
    for name, noise in (("real", 10), ("fake", 60)):
        (root / name).mkdir()
        for i in range(3):
            centre = rng.uniform(4, 12, 2)
            blob = np.exp(-((grid - centre) ** 2).sum(-1) / 20)[..., None] * rng.uniform(80, 255, 3)
            image = np.clip(blob + rng.normal(0, noise, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def _uint8(folder):
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                        for p in sorted(folder.glob("*.png"))])


def _fid(capsys, *argv) -> dict:
    assert main(["fid", *map(str, argv)]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_architecture_matches_torch_fidelity():
    state = FIDInceptionV3().state_dict()
    described = ";".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    assert hashlib.sha256(described.encode()).hexdigest() == TORCH_FIDELITY_STATE_DIGEST
    assert len(state) == 566 and sum(v.numel() for v in state.values()) == 23_885_486


def test_cli_inception_fid_equals_torchmetrics_direct(weights, folders, capsys, tmp_path):
    w = weights / "inception.safetensors"
    result = _fid(capsys, folders / "fake", "--reference", folders / "real", "--features", "inception",
                  "--inception-weights", w, "--save-stats", tmp_path / "real.npz", "--batch-size", 4)

    direct = FrechetInceptionDistance(feature=load_inception(w), normalize=False)
    direct.update(_uint8(folders / "real"), real=True)
    direct.update(_uint8(folders / "fake"), real=False)
    expected = float(direct.compute())
    assert expected > 1e-3  # a real distance, not a degenerate network
    assert result["value"] == pytest.approx(expected, rel=1e-5)
    p = result["protocol"]
    assert p["metric"] == "FID" and p["num_samples"] == 3 and p["num_reference"] == 3
    assert "antialias off" in p["resize"] and p["input_size"] == 299 and p["image_size"] == [3, 16, 16]
    assert p["reference"] == str(folders / "real") and p["weights"] == str(w)

    with np.load(tmp_path / "real.npz") as saved:
        assert saved["mu"].shape == (2048,) and int(saved["num_samples"]) == 3
        assert str(saved["features"]) == "inception"


def test_reference_statistics_are_cached_by_content(capsys, monkeypatch, tmp_path):
    import onestep.eval.image_files as image_files
    from onestep.data.digits import load_digits_tensors
    from onestep.eval.quantize import to_uint8

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    images = to_uint8(load_digits_tensors()[0][:60])
    for name, part in (("real", images[:40]), ("fake", images[40:])):
        (tmp_path / name).mkdir()
        for i, image in enumerate(part):
            Image.fromarray(image[0].numpy()).save(tmp_path / name / f"{i}.png")
    read, consumed = image_files.iter_image_batches, []

    def spy(path, *args, **kwargs):
        consumed.append(path.name)
        yield from read(path, *args, **kwargs)

    monkeypatch.setattr(image_files, "iter_image_batches", spy)
    args = (tmp_path / "fake", "--reference", tmp_path / "real")
    first = _fid(capsys, *args)["value"]
    assert consumed == ["real", "fake"] and len(list((tmp_path / "cache" / "fd_stats").glob("digits-*.npz"))) == 1
    assert _fid(capsys, *args)["value"] == pytest.approx(first, rel=1e-9)
    assert consumed == ["real", "fake", "fake"]  # the reference was not read through the network again
    Image.fromarray(images[50, 0].numpy()).save(tmp_path / "real" / "0.png")  # new content: a new key
    assert _fid(capsys, *args)["value"] != pytest.approx(first, rel=1e-9)
    assert consumed[-2:] == ["real", "fake"]


def test_pickled_inception_weights_need_an_explicit_allow(weights, capsys, tmp_path):
    from onestep.errors import UserInputError

    with pytest.raises(UserInputError, match="pickle"):
        load_inception(weights / "inception.pth")
    from_pickle = load_inception(weights / "inception.pth", allow_pickle=True).state_dict()
    from_safetensors = load_inception(weights / "inception.safetensors").state_dict()
    assert all(torch.equal(from_pickle[k], v) for k, v in from_safetensors.items())

    np.savez(tmp_path / "samples.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["fid", str(tmp_path / "samples.npz"), "--features", "inception",
                 "--inception-weights", str(weights / "inception.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pickle" in err and "convert_inception_weights.py" in err

    from scripts.convert_inception_weights import main as convert

    assert convert([str(weights / "inception.pth"), str(tmp_path / "converted.safetensors")]) == 0
    converted = load_inception(tmp_path / "converted.safetensors").state_dict()
    assert all(torch.equal(converted[k], v) for k, v in from_safetensors.items())


def test_save_stats_of_a_reference_alone_and_bad_stats_files(capsys, tmp_path):
    from onestep.data.digits import load_digits_tensors
    from onestep.eval.quantize import to_uint8

    out = tmp_path / "digits.npz"
    assert main(["fid", "--save-stats", str(out)]) == 0
    with np.load(out) as stats:
        assert stats["mu"].shape == (64,) and int(stats["num_samples"]) == 1797 and str(stats["features"]) == "digits"
    capsys.readouterr()

    # pytorch-fid's / clean-fid's {mu, sigma} layout gives the same number as ours
    np.savez(tmp_path / "fake.npz", images=to_uint8(load_digits_tensors()[0][:300]).permute(0, 2, 3, 1).numpy())
    expected = _fid(capsys, tmp_path / "fake.npz", "--reference", out)["value"]
    with np.load(out) as ours:
        np.savez(tmp_path / "pytorch_fid.npz", mu=ours["mu"], sigma=ours["sigma"])
    result = _fid(capsys, tmp_path / "fake.npz", "--reference", tmp_path / "pytorch_fid.npz")
    assert result["value"] == pytest.approx(expected, rel=1e-9) and result["protocol"]["num_reference"] is None

    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(64))
    np.savez(tmp_path / "samples.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for reference, word in ((tmp_path / "no_sigma.npz", "lacks sigma"), (tmp_path / "junk.npz", "cannot read"),
                            (tmp_path / "missing.npz", "not found")):
        assert main(["fid", str(tmp_path / "samples.npz"), "--reference", str(reference)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err, err
    assert main(["fid"]) == 2 and "--save-stats" in capsys.readouterr().err
