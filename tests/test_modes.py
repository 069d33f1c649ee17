"""The mode-coverage benchmark: the generated mode set, its rule classifier, the coverage metric, `--suite modes`."""

import json

import numpy as np
import pytest
import torch
from conftest import save_folder, scheduler, tiny_unet

from onestep.cli import main
from onestep.data.modes import MODE_SETS, QUADRANTS, draw_square, make_modes_images, write_modes_folder
from onestep.errors import UserInputError
from onestep.eval.modes import OFF_MODE, ModeCounts, classify_modes, count_modes, coverage


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


SQUARES, SECONDARIES = MODE_SETS["squares"], MODE_SETS["secondaries"]
RED, GREEN = SQUARES.channels[:2]


@pytest.mark.parametrize("name", sorted(MODE_SETS))
def test_generated_set_has_exact_weights_and_the_rule_recovers_every_label(name):
    modes_of = MODE_SETS[name]
    images, modes, quadrants = make_modes_images(2000, seed=3, modes_of=modes_of)
    assert images.shape == (2000, 8, 8, 3) and images.dtype == np.uint8
    cells = np.zeros((len(modes_of.modes), len(QUADRANTS)))
    np.add.at(cells, (modes, quadrants), 1)
    np.testing.assert_allclose(cells, modes_of.submode_weights() * 2000)  # stratified, not drawn
    found_modes, found_quadrants = classify_modes(as_tensor(images), modes_of)
    np.testing.assert_array_equal(found_modes.numpy(), modes)
    np.testing.assert_array_equal(found_quadrants.numpy(), quadrants)
    assert (make_modes_images(2000, seed=3, modes_of=modes_of)[0] == images).all()  # seeded
    other = SQUARES if modes_of is SECONDARIES else SECONDARIES  # no image of one set is a mode of the other
    assert (classify_modes(as_tensor(images), other)[0] == OFF_MODE).all()


def test_secondaries_have_unequal_submodes_and_a_blend_of_two_is_off_mode():
    np.testing.assert_allclose(SECONDARIES.submode_weights().sum(), 1.0)
    assert SECONDARIES.submode_weights()[2, 3] == pytest.approx(0.01)  # magenta, bottom-right: the rarest
    yellow, cyan, _ = SECONDARIES.channels
    blend = ((draw_square(yellow, 1, (0, 0), 1.0).astype(float) + draw_square(cyan, 1, (0, 0), 1.0)) / 2)
    modes, _ = classify_modes(as_tensor(np.stack([blend.astype(np.uint8), draw_square(yellow, 1, (0, 0), 0.8)])),
                              SECONDARIES)
    assert modes.tolist() == [OFF_MODE, 0]


def test_write_modes_folder_refuses_a_folder_in_use(tmp_path):
    write_modes_folder(tmp_path / "data", 80)
    assert len(list((tmp_path / "data").glob("*.png"))) == 80
    with pytest.raises(UserInputError, match="not an empty folder"):
        write_modes_folder(tmp_path / "data", 80)


def test_images_of_no_mode_are_off_mode():
    red_top_left = draw_square(RED, 0, (1, 1), 1.0)
    yellow = red_top_left.copy()
    yellow[..., 1] = yellow[..., 0]  # red + green: a mixed colour, no mode
    pinkish = red_top_left.copy()
    pinkish[..., 2] = (0.4 * red_top_left[..., 0]).astype(np.uint8)  # a channel neither on nor off
    two = red_top_left | draw_square(GREEN, 3, (0, 0), 1.0)  # two squares
    straddling = np.zeros_like(red_top_left)
    straddling[2:5, 3:6, 0] = 255  # one square across two quadrants
    big = np.zeros_like(red_top_left)
    big[:, :4, 2] = 255  # a smear: too many lit pixels
    dim = (red_top_left * 0.3).astype(np.uint8)  # not lit
    batch = np.stack([red_top_left, yellow, pinkish, two, straddling, big, dim, np.zeros_like(red_top_left)])
    modes, quadrants = classify_modes(as_tensor(batch))
    assert modes.tolist() == [0] + [OFF_MODE] * 7
    assert quadrants.tolist() == [0] + [OFF_MODE] * 7


def test_coverage_of_a_known_biased_sample_set():
    images, modes, quadrants = make_modes_images(4000, seed=0)
    teacher = count_modes(as_tensor(images))
    # the student: three quarters of the white top-left images replaced by blank (off-mode) images, and 100 green
    # samples turned red
    biased = images.copy()
    white_tl = np.flatnonzero((modes == 3) & (quadrants == 0))
    biased[white_tl[: 3 * len(white_tl) // 4]] = 0
    green = np.flatnonzero(modes == 1)[:100]
    biased[green] = biased[green][..., [1, 0, 2]]
    student = count_modes(as_tensor(biased))
    result = coverage(student, teacher)
    # direct re-computation: white loses 37 of 200 (0.0125 * 4000 = 50 top-left: 37 blank), green gives 100 to red
    assert result["off_mode"] == pytest.approx(37 / 4000)
    shares = result["mode_shares"]
    assert shares == pytest.approx({"red": 2100 / 4000, "green": 1100 / 4000, "blue": 0.15, "white": 163 / 4000})
    assert result["mode_weight_error"] == pytest.approx(100 / 4000)
    se = np.sqrt(0.525 * 0.475 / 4000 + 0.5 * 0.5 / 4000)  # red and green tie at 0.025: the first, red, is named
    assert result["worst_mode"] == "red" and result["mode_weight_error_se"] == pytest.approx(se)
    assert result["worst_submode"] == "white/top-left"
    assert result["worst_submode_ratio"] == pytest.approx(13 / 50)
    rel = np.sqrt((1 - 13 / 4000) / 13 + (1 - 50 / 4000) / 50)
    assert result["worst_submode_ratio_se"] == pytest.approx(13 / 50 * rel)
    assert coverage(teacher, teacher)["mode_weight_error"] == 0.0
    assert min(coverage(teacher, teacher)["submode_ratio"].values()) == 1.0
    summed = ModeCounts.of(*classify_modes(as_tensor(images[:1000]))) + count_modes(as_tensor(images[1000:]))
    assert summed.total == 4000 and (summed.cells == teacher.cells).all()


def _run_folder(root, teacher_dir, unet, method="dmd2"):
    from onestep.export.pipeline import export_generator
    from onestep.models.generator import Generator
    from onestep.models.teacher import Teacher

    teacher = Teacher.from_pretrained(teacher_dir)
    export_generator(Generator.from_teacher(unet, teacher.schedule, [999]), teacher, root / "pipeline")
    (root / "config.json").write_text(json.dumps({"method": method, "teacher": {"path": str(teacher_dir),
                                                                                "guidance_scale": 1.0}}))
    (root / "metrics.json").write_text(json.dumps({"step": 7, "train_seconds": 30.0}))
    return root


def test_cli_modes_suite_on_a_tiny_run(tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    save_folder(teacher_dir, "DDPMPipeline", unet=tiny_unet(None, channels=3), scheduler=scheduler())
    run = _run_folder(tmp_path / "run", teacher_dir, tiny_unet(None, channels=3, seed=1))
    out = tmp_path / "bench"
    code = main(["bench", "--suite", "modes", str(run), "--out", str(out), "--num-samples", "12",
                 "--teacher-steps", "2", "--seeds", "0", "1", "--mode-set", "secondaries"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "modes.json").read_text())
    assert report["mode_set"] == "secondaries" and set(report["rows"][1]["mode_shares"]) == set(SECONDARIES.names)
    assert [r["name"] for r in report["rows"]] == ["teacher DDIM 2", "dmd2 (run)"]
    for row in report["rows"]:  # random networks draw noise: every sample off-mode, no sub-mode to compare
        assert row["num_samples"] == 24 and row["off_mode"] == 1.0 and row["worst_submode_ratio"] is None
    assert [r["target_met"] for r in report["rows"]] == [None, False]  # the teacher is the reference
    table = (out / "modes.md").read_text()
    assert "N = 24 samples per sampler" in table and "| dmd2 (run) | 1 |" in table
    assert "mode set secondaries" in table and "quadrants 0.4 / 0.3 / 0.2 / 0.1" in table
    assert "was it trained on another (--mode-set)?" in capsys.readouterr().err  # a random teacher: all off-mode
    assert "missed" in table and "reference" in table
    # a class-conditional teacher has no unconditional modes: one line, exit 2
    conditional = tmp_path / "conditional"
    save_folder(conditional, "X", unet=tiny_unet(3, channels=3), scheduler=scheduler())
    code = main(["bench", "--suite", "modes", str(_run_folder(tmp_path / "run2", conditional, tiny_unet(3, 3))),
                 "--out", str(tmp_path / "bench2"), "--num-samples", "4", "--teacher-steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "unconditional teacher" in err and "Traceback" not in err
    code = main(["bench", "--suite", "modes", str(run), "--out", str(tmp_path / "bench3"), "--mode-set", "tulips"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown mode set 'tulips'" in err and not (tmp_path / "bench3").exists()
