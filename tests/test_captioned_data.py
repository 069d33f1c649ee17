"""Captioned datasets: streaming, per-image captions wherever real images are used, latent cache, bad inputs, and
every distiller trained from a captioned imagefolder on a tiny SD1.5-shaped teacher."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onestep.cli import main
from onestep.config import DataConfig
from onestep.data.real import DataSource
from onestep.errors import UserInputError


CAPTIONS = ["a cat", "dog", "cat dog", "a dog"]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """datasets prepares an imagefolder's Arrow table in its cache: keep it inside the test's folder."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def captioned_folder(path: Path, n: int = 8, captions=CAPTIONS, extra: dict | None = None) -> Path:
    """n RGB images of assorted sizes (not the teacher's) and a metadata.jsonl with their captions."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(path / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20 + i, 24 + 2 * i, 3), dtype=np.uint8)).save(path / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": captions[i % len(captions)], **(extra or {})}) + "\n")
    return path


def source(text_teacher, folder: Path, **data) -> DataSource:
    return DataSource(DataConfig(name="image_folder", image_dir=str(folder), num_workers=0, batch_size=4, **data),
                      text_teacher)


def test_rows_are_resized_cropped_and_keep_their_captions(tmp_path, text_teacher):
    folder = captioned_folder(tmp_path / "images")
    rows = source(text_teacher, folder).rows(center_crop=True, random_flip=False)
    assert len(rows) == 8
    for i in range(8):
        item = rows[i]
        assert item["x"].shape == (3, 16, 16)  # 8x8 latents, VAE factor 2
        assert item["x"].min() >= -1 and item["x"].max() <= 1
        assert item["caption"] == CAPTIONS[i % 4]
    # the center crop of the resized image, compared with a direct PIL computation
    with Image.open(folder / "3.png") as img:
        w, h = img.size
        scale = 16 / min(w, h)
        resized = img.convert("RGB").resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        left = (resized.size[0] - 16) // 2
        expected = np.asarray(resized.crop((left, 0, left + 16, 16)), dtype=np.float32) / 127.5 - 1
    torch.testing.assert_close(rows[3]["x"], torch.from_numpy(expected).permute(2, 0, 1))


def test_saved_dataset_with_its_own_column_names(tmp_path, text_teacher):
    """A `save_to_disk` dataset whose images are bytes in Arrow (as Hub datasets are) and columns named otherwise."""
    import datasets

    folder = captioned_folder(tmp_path / "images", n=3)
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"img": [{"bytes": (folder / f"{i}.png").read_bytes(), "path": None}
                                                for i in range(3)], "caption": ["x", "y", "z"]}, features=features)
    table.save_to_disk(tmp_path / "saved")
    data = DataSource(DataConfig(name="dataset", dataset=str(tmp_path / "saved"), image_column="img",
                                 caption_column="caption", num_workers=0), text_teacher)
    rows = data.rows(center_crop=True, random_flip=False)
    assert [rows[i]["caption"] for i in range(3)] == ["x", "y", "z"] and rows[0]["x"].shape == (3, 16, 16)
    assert data.captions() == ["x", "y", "z"]


def test_stream_yields_batches_with_their_own_conditions(tmp_path, text_teacher):
    real = source(text_teacher, captioned_folder(tmp_path / "images")).real(
        text_teacher.encode_prompts, seed=0, cache_dir=None)
    seen = []
    for _ in range(5):  # 20 rows from 8: the stream wraps around epochs
        batch = real.next_batch(4)
        seen.extend(batch["caption"])
        assert batch["x"].shape == (4, 3, 16, 16)
    assert set(seen) == set(CAPTIONS)
    x, condition = real.sample(3, "cpu")
    assert x.shape == (3, 4, 8, 8) and condition.encoder_hidden_states.shape[0] == 3


def test_each_process_reads_its_own_shard(tmp_path, text_teacher, monkeypatch):
    from onestep.data import streaming

    folder = captioned_folder(tmp_path / "images", captions=[f"{c}" for c in "abcdefgh"])
    shards = []
    for rank in range(2):
        state = type("State", (), {"num_processes": 2, "process_index": rank})()
        monkeypatch.setattr("onestep.training.trainer.process_state", lambda state=state: state)
        real = source(text_teacher, folder).real(None, seed=0, cache_dir=None)
        shards.append(set(real.next_batch(4)["caption"]))
        assert isinstance(real, streaming.StreamingImages)
    assert shards[0].isdisjoint(shards[1]) and len(shards[0] | shards[1]) == 8


def test_gan_real_branch_gets_each_images_own_caption(tmp_path, text_teacher):
    """Spy on the critic: the real images' logits are computed with the embedding of each image's own caption."""
    from onestep.data.conditions import ConditionSampler
    from onestep.distillers import DMDOptions, build_distiller

    captions = [f"{a} {b}" for a in ("cat", "dog", "a") for b in ("cat", "dog")]
    folder = captioned_folder(tmp_path / "images", n=6, captions=captions)
    conditions = ConditionSampler(prompts=captions, encode=text_teacher.encode_prompts)
    real = source(text_teacher, folder, random_flip=False).real(conditions.encode, seed=0, cache_dir=None)
    dmd = build_distiller("dmd2", text_teacher, DMDOptions(), conditions=conditions, real=real, batch_size=3)
    drawn = []
    original = real.next_batch
    real.next_batch = lambda n: drawn.append(original(n)) or drawn[-1]
    calls = []
    forward = dmd.fake.forward

    def spy(x_t, t, condition, output="x0"):
        calls.append((output, condition))
        return forward(x_t, t, condition, output=output)

    dmd.fake.forward = spy
    dmd.critic_loss(dmd.fake)
    real_condition = [c for out, c in calls if out == "logits"][-1]
    expected = text_teacher.encode_prompts(drawn[0]["caption"]).encoder_hidden_states
    torch.testing.assert_close(real_condition.encoder_hidden_states, expected)
    assert len(set(drawn[0]["caption"])) > 1  # distinct captions, so a shared (empty) prompt would not pass
    empty = text_teacher.encode_prompts([""] * 3).encoder_hidden_states
    assert not torch.allclose(real_condition.encoder_hidden_states, empty)


def test_msd_student_sees_real_images_of_its_own_prompts(tmp_path, text_teacher):
    folder = captioned_folder(tmp_path / "images")
    real = source(text_teacher, folder).real(None, seed=0, cache_dir=None)
    own = real.subset(prompts=["dog", "a dog"])
    assert len(own.rows) == 4
    assert set(own.next_batch(4)["caption"]) == {"dog", "a dog"}


def test_latent_cache_gives_the_same_loss_as_encoding_on_the_fly(tmp_path, text_teacher):
    from onestep.data.conditions import ConditionSampler
    from onestep.distillers import DMDOptions, build_distiller

    folder = captioned_folder(tmp_path / "images")
    conditions = ConditionSampler(prompts=CAPTIONS, encode=text_teacher.encode_prompts)
    losses = []
    for cache in (None, tmp_path / "cache"):
        data = source(text_teacher, folder, random_flip=False, latent_cache_dtype="float32")
        real = data.real(conditions.encode, seed=0, cache_dir=cache)
        torch.manual_seed(0)
        dmd = build_distiller("dmd2", text_teacher, DMDOptions(), conditions=conditions, real=real, batch_size=4)
        torch.manual_seed(1)
        losses.append(dmd.critic_loss(dmd.fake).logs)
    assert (tmp_path / "cache" / "latents.json").is_file()
    assert losses[0]["d_real"] == pytest.approx(losses[1]["d_real"], rel=1e-4, abs=1e-5)
    assert losses[0]["gan_d"] == pytest.approx(losses[1]["gan_d"], rel=1e-4)
    # a cache written for other settings is refused rather than silently reused
    with pytest.raises(UserInputError, match="another dataset"):
        source(text_teacher, folder, latent_cache_dtype="float16").real(None, seed=0, cache_dir=tmp_path / "cache")


def test_unreadable_image_is_skipped_and_counted(tmp_path, text_teacher, capsys):
    folder = captioned_folder(tmp_path / "images", n=4)
    (folder / "1.png").write_bytes(b"not a png")
    real = source(text_teacher, folder).real(None, seed=0, cache_dir=None)
    batch = real.next_batch(6)
    assert len(batch["x"]) == 6 and "dog" not in batch["caption"]  # row 1 ("dog") never appears
    assert len(real.skipped) == 1 and "1.png" in capsys.readouterr().err
    for i in (0, 2, 3):
        (folder / f"{i}.png").write_bytes(b"")
    with pytest.raises(UserInputError, match="no readable image"):
        source(text_teacher, folder).real(None, seed=0, cache_dir=None).next_batch(2)


# --- the command line: bad inputs, and every distiller from a captioned folder --------------------------------------
def _config(tmp_path, teacher, method, name, **options) -> Path:
    cfg = {"method": method, "output_dir": str(tmp_path / name), "teacher": {"path": str(teacher)},
           "data": {"name": "image_folder", "image_dir": str(tmp_path / "images"), "batch_size": 2, "num_workers": 0},
           "train": {"max_steps": 2, "checkpoint_every": 2, "log_every": 1}, "eval": {"num_samples": 4},
           "options": options}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_bad_caption_column_and_missing_folder_exit_2(tmp_path, sd15_folder, capsys):
    import transformers

    transformers.utils.logging.enable_progress_bar()  # `onestep train` must silence the text encoder's loading bar
    captioned_folder(tmp_path / "images", n=2)
    config = _config(tmp_path, sd15_folder, "sid", "bad")
    for override, words in (("data.caption_column=prompt", ("caption_column", "'prompt'", "columns: image, text")),
                            (f"data.image_dir={tmp_path / 'nope'}", ("image folder not found",)),
                            ("data.image_column=img", ("image_column",))):
        assert main(["train", str(config), override]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "bad").exists()


DISTILL_OPTIONS = {
    "dmd": {"regression": {"num_pairs": 2, "teacher_steps": 2, "batch_size": 2}},
    "dmd2": {"generator_every": 1},
    "sid": {},
    "sfd": {"forget_prompts": ["dog"]},
    "msd": {"num_students": 2, "partition": "text_pca", "student": 1, "gan": True},
    "tsm": {"block_out_channels": [8, 16]},
    "disback": {"num_checkpoints": 1, "steps_per_checkpoint": 1, "switch_every": 1},
    "disback_sid": {"num_checkpoints": 1, "steps_per_checkpoint": 1, "switch_every": 1},
    "boot": {"num_grid_steps": 2},
}


@pytest.mark.parametrize("method", sorted(DISTILL_OPTIONS))
def test_every_distiller_trains_resumes_and_exports_from_a_captioned_folder(tmp_path, sd15_folder, method):
    captioned_folder(tmp_path / "images", n=6)
    config = _config(tmp_path, sd15_folder, method, "run", **DISTILL_OPTIONS[method])
    assert main(["train", str(config)]) == 0
    out = tmp_path / "run"
    assert (out / "pipeline" / "model_index.json").is_file()
    assert main(["train", str(config), "train.max_steps=3"]) == 0  # resumes from step 2's checkpoint
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if r.get("event") in ("started", "resumed")] == ["started", "resumed"]
    assert json.loads((out / "metrics.json").read_text())["step"] == 3


def test_in_memory_images_keep_their_captions_too(text_teacher):
    """RealImages with captions (the coloured digits_t2i set): sampled images come with their own captions' Condition,
    and an MSD slice keeps the images of its prompts."""
    from onestep.data.conditions import RealImages

    images = torch.arange(4.0)[:, None, None, None].expand(4, 3, 16, 16)
    captions = ["a cat", "dog", "a cat", "cat dog"]
    seen = []
    real = RealImages(images, captions=captions,
                      caption_condition=lambda caps: seen.append(caps) or text_teacher.encode_prompts(caps))
    torch.manual_seed(0)
    x, condition = real.sample(6, "cpu")
    picked = [captions[int(v)] for v in x[:, 0, 0, 0]]
    assert seen[-1] == picked and real.conditioned
    expected = text_teacher.encode_prompts(picked).encoder_hidden_states
    torch.testing.assert_close(condition.encoder_hidden_states, expected)
    own = real.subset(prompts=["a cat"])
    assert own.captions == ["a cat", "a cat"] and own.images[:, 0, 0, 0].tolist() == [0.0, 2.0]


def test_a_killed_cache_build_goes_on_from_its_last_shard_and_a_damaged_shard_is_refused(tmp_path, text_teacher):
    from onestep.data.latent_cache import INDEX, PROGRESS, CachedMoments, build_latent_cache

    folder = captioned_folder(tmp_path / "images", n=12)
    rows = source(text_teacher, folder).rows(center_crop=True, random_flip=False)
    settings = {"the": "settings"}
    build_latent_cache(rows, text_teacher.encode_moments, tmp_path / "straight", settings, batch_size=2,
                       shard_size=4)
    encoded = []

    def killed_after_two_shards(x):
        if len(encoded) == 5:  # the 6th batch: shards 0 (rows 0-3) and 1 (rows 4-7) are written, row 8-9 pending
            raise KeyboardInterrupt
        encoded.append(len(x))
        return text_teacher.encode_moments(x)

    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(rows, killed_after_two_shards, cache, settings, batch_size=2, shard_size=4)
    assert not (cache / INDEX).exists() and json.loads((cache / PROGRESS).read_text())["rows"] == 8
    encoded.clear()
    rng = torch.get_rng_state()
    build_latent_cache(rows, lambda x: (encoded.append(len(x)), text_teacher.encode_moments(x))[1], cache, settings,
                       batch_size=2, shard_size=4)
    assert encoded == [2, 2]  # only rows 8-11 were encoded again
    # the networks built next draw the same random numbers whether the build ran whole, went on or was found done
    assert torch.equal(torch.get_rng_state(), rng)
    assert not (cache / PROGRESS).exists()
    shards = sorted(p.name for p in cache.glob("shard-*"))
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    for name in [*shards, INDEX]:  # the same bytes as an uninterrupted build
        assert (cache / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert len(CachedMoments(cache).rows) == 12
    size = (cache / shards[1]).stat().st_size
    with open(cache / shards[1], "r+b") as f:
        f.truncate(size - 7)
    with pytest.raises(UserInputError, match=f"damaged: {shards[1]} is {size - 7} bytes, {size} bytes were written"):
        CachedMoments(cache)


def test_a_stream_resumed_from_its_state_reads_on_from_the_same_row(tmp_path, text_teacher):
    folder = captioned_folder(tmp_path / "images", n=6)

    def stream():
        return source(text_teacher, folder).real(None, seed=0, cache_dir=None)

    whole = stream()
    torch.manual_seed(0)
    straight = [whole.next_batch(4) for _ in range(5)]  # crosses epochs (6 rows), joins and splits batches
    first = stream()
    torch.manual_seed(0)
    resumed = [first.next_batch(4) for _ in range(2)]
    state, rng = first.state_dict(), torch.get_rng_state()
    second = stream()
    second.load_state_dict(state)
    torch.set_rng_state(rng)  # as the checkpoint restores it
    resumed += [second.next_batch(4) for _ in range(3)]
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a["x"], b["x"]) and a["caption"] == b["caption"]  # the same rows and the same flips
