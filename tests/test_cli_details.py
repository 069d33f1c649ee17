"""The smaller things a first day trips on (issue 27, item 8): YAML's `no`, `--overwrite` anywhere, typos blamed on
the right place, fid's judge checked before sampling, skipped images said, workers capped, the export's JSON, sample
grids with their prompts, and the config reference kept up to date."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from onestep.cli import _parse_args, build_parser, main
from onestep.config import load_config
from onestep.config_reference import markdown


ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "digits" / "dmd2.yaml"


def one_line_error(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_mixed_precision_no_is_the_string_no(tmp_path):
    assert load_config(DEMO, ["output_dir=x", "train.mixed_precision=no"]).train.mixed_precision == "no"
    config = tmp_path / "c.yaml"
    config.write_text(DEMO.read_text().replace("  seed: 0\n", "  seed: 0\n  mixed_precision: no\n"))
    assert load_config(config, ["output_dir=x"]).train.mixed_precision == "no"


def test_overwrite_may_stand_anywhere(tmp_path, capsys):
    args = _parse_args(build_parser(), ["train", "c.yaml", "a=1", "--overwrite", "b=2"])
    assert args.overwrite and args.overrides == ["a=1", "b=2"]
    # the override after --overwrite is read (its bad value refused) before anything is moved
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert "max_steps" in one_line_error(capsys, "train", DEMO, "--overwrite", f"output_dir={tmp_path / 'out'}",
                                         "train.max_steps=ten")
    assert (tmp_path / "out" / "keep.txt").is_file()
    with pytest.raises(SystemExit):
        _parse_args(build_parser(), ["sample", "x", "--out", "y.png", "z=1"])  # only train takes overrides


def test_a_typo_is_blamed_where_it_is(tmp_path, capsys):
    err = one_line_error(capsys, "train", DEMO, f"output_dir={tmp_path}", "optoins.gan=false")
    assert "bad command-line override" in err and "optoins" in err and str(DEMO) not in err
    config = tmp_path / "typo.yaml"
    config.write_text(DEMO.read_text().replace("generator_every:", "generator_evry:"))
    err = one_line_error(capsys, "train", config, f"output_dir={tmp_path}", "train.max_steps=2")
    assert f"bad {config}" in err and "generator_evry" in err


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny SD1.5-shaped dmd2 run (prompts only, 1 step), trained through the CLI."""
    from tests.conftest import sd_folder

    tmp = tmp_path_factory.mktemp("text_run")
    teacher = sd_folder(tmp / "sd15", "sd15")
    (tmp / "prompts.txt").write_text("a cat\ndog\n")
    config = {"method": "dmd2", "output_dir": str(tmp / "run"), "teacher": {"path": str(teacher)},
              "data": {"name": "prompts", "prompts": str(tmp / "prompts.txt"), "batch_size": 2},
              "train": {"max_steps": 1, "log_every": 1}, "eval": {"num_samples": 4, "sampling_batch": 4},
              "options": {"gan": False, "generator_every": 1}}
    (tmp / "run.yaml").write_text(json.dumps(config))
    assert main(["train", str(tmp / "run.yaml")]) == 0
    return tmp


def test_fid_of_a_text_pipeline_checks_its_judge_before_sampling(text_run, capsys, monkeypatch):
    from onestep.sampling.inference import FolderSampler

    drawn = []
    monkeypatch.setattr(FolderSampler, "_draw", lambda self, *a: drawn.append(a))
    err = one_line_error(capsys, "fid", text_run / "run" / "pipeline", "--prompts", text_run / "prompts.txt")
    assert "text-to-image" in err and "--features" in err and drawn == []


def test_export_names_both_folders_it_writes(text_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(text_run / "run"), "--out", str(tmp_path / "X")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == {"pipeline": str(tmp_path / "X"), "diffusers": str(tmp_path / "X_diffusers")}
    assert (tmp_path / "X_diffusers" / "model_index.json").is_file()


def test_sample_grids_carry_their_prompts(text_run, tmp_path, capsys):
    from PIL import Image

    from onestep.eval.grid import grid_array

    images = torch.full((4, 3, 16, 16), 200, dtype=torch.uint8)
    plain, labelled = grid_array(images), grid_array(images, labels=["a cat", "dog", "a cat", "dog"])
    assert labelled.shape[0] > plain.shape[0] and labelled.shape[1] == plain.shape[1]
    strip = labelled[2 + 64:2 + 64 + 12, 2:2 + 64]  # under the first image: dark text on white
    assert (strip < 100).any() and (strip == 255).mean() > 0.5
    assert main(["sample", str(text_run / "run" / "pipeline"), "--prompts", str(text_run / "prompts.txt"),
                 "--num-images", "4", "--out", str(tmp_path / "grid.png")]) == 0
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[::-1] == labelled.shape[:2]
    # the training run's own grid: its validation prompts under the images
    with Image.open(text_run / "run" / "samples.png") as grid:
        assert grid.size[1] > grid_array(np.zeros((4, 16, 16, 3), np.uint8), nrow=2).shape[0]


def test_latent_cache_says_which_image_it_leaves_out(tmp_path, text_teacher, capsys, monkeypatch):
    from tests.test_captioned_data import captioned_folder, source

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = captioned_folder(tmp_path / "images", n=4)
    (folder / "2.png").write_bytes(b"not a png")
    source(text_teacher, folder).real(None, seed=0, cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    assert "latent cache: skipped an unreadable image (1 so far)" in err and "2.png" in err
    source(text_teacher, folder).real(None, seed=0, cache_dir=tmp_path / "cache")  # reused: still said
    assert "leaves out 1 unreadable image" in capsys.readouterr().err


def test_workers_are_capped_at_the_usable_cores(tmp_path, text_teacher, monkeypatch):
    import os

    from onestep.data.streaming import usable_workers
    from tests.test_captioned_data import captioned_folder, source

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert usable_workers(8) == 2 and usable_workers(1) == 1 and usable_workers(0) == 0
    folder = captioned_folder(tmp_path / "images", n=2)
    data = source(text_teacher, folder)
    data.data.num_workers = 8  # a recipe's value
    assert data.real(None, seed=0, cache_dir=None).num_workers == 2


def test_config_reference_is_up_to_date(capsys):
    """docs/config.md lists every key; regenerate it with `python -m onestep.config_reference > docs/config.md`."""
    text = markdown()
    assert (ROOT / "docs" / "config.md").read_text() == text
    for key in ("data.num_workers", "train.max_steps", "options.generator_optimizer.lr", "options.lora.rank",
                "teacher.dtype", "eval.features", "init_critic"):
        assert f"`{key}`" in text
    assert "|  |" not in text  # every key has a meaning
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "docs/config.md" in capsys.readouterr().out
