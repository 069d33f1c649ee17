"""The model card of an exported folder: front matter, metrics, training config, and loading code that runs."""

import json
import re

import yaml
from huggingface_hub import ModelCard

from onestep.cli import main
from onestep.export.model_card import write_model_card
from onestep.export.pipeline import export_generator
from onestep.models.generator import Generator
from onestep.models.teacher import Teacher
from tests.conftest import scheduler, tiny_clip, tiny_text_unet, tiny_vae
from tests.test_cli import DEMO


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_card_of_a_text_student_with_its_stock_copy(tmp_path, monkeypatch):
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    (teacher_dir / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# a teacher\n")
    encoder, tokenizer = tiny_clip(tmp_path)
    teacher = Teacher(tiny_text_unet().eval(), scheduler("epsilon", zero_snr=False), vae=tiny_vae().eval(),
                      text_encoder=encoder, tokenizer=tokenizer)
    run = tmp_path / "run"
    export_generator(Generator.from_teacher(teacher.unet, teacher.schedule), teacher, run / "pipeline")
    run_config = {"method": "dmd2", "teacher": {"path": str(teacher_dir), "guidance_scale": 4.5},
                  "train": {"max_steps": 7, "max_minutes": None}}
    metrics = {"step": 7, "train_seconds": 1.5, "final": {"clip_score": 0.3125, "fid": 12.5}}
    write_model_card(run / "pipeline", run_config, metrics)

    card = ModelCard.load(run / "pipeline" / "README.md")
    # a local folder is no Hub id: the text names it by its absolute path, base_model stays unset
    assert card.data.base_model is None and card.data.license == "creativeml-openrail-m"
    assert f"# dmd2 student of `{teacher_dir}`" in card.text
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert "dmd2" in card.data.tags and "Distribution Matching Distillation" in card.text
    assert "| clip_score | 0.3125 |" in card.text and "| fid | 12.5 |" in card.text and "step 7" in card.text
    assert "reads out at timesteps [999] from sigma_t0 z" in card.text
    config = re.search(r"```yaml\n(.*?)```", card.text, flags=re.S).group(1)
    assert yaml.safe_load(config) == run_config
    assert (run / "pipeline_diffusers" / "README.md").read_text() == (run / "pipeline" / "README.md").read_text()

    blocks = python_blocks(card.text)
    assert len(blocks) == 4 and "trust_remote_code=True" in blocks[1] and "StableDiffusionPipeline" in blocks[2]
    assert "from_single_file" in blocks[3]  # the student as one original-layout file (onestep.export.single_file)
    monkeypatch.chdir(run)  # the card names the folders relative to the run folder
    for block in (blocks[0], blocks[2], blocks[3]):  # (the custom_pipeline load is tested in test_pipelines)
        scope = {}
        exec(block, scope)
        assert scope["pipe"] is not None and ("images" in scope or "image" in scope)


def test_training_and_export_write_the_card(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(DEMO), f"output_dir={out}", "train.max_steps=2", "train.max_minutes=null",
                 "eval.num_samples=20", "data.batch_size=4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    card = ModelCard.load(out / "pipeline" / "README.md")
    assert card.data.base_model is None and card.data.license is None  # the digits card states none
    assert "# dmd2 student of `builtin:digits`" in card.text
    assert card.data.pipeline_tag == "unconditional-image-generation"
    value = metrics["final"]["fd_digits/student"]
    assert f"| fd_digits/student | {value:.6g} |" in card.text
    assert not (out / "pipeline_diffusers").exists()  # a pixel-space class-conditional student: no stock copy
    (out / "pipeline" / "README.md").unlink()
    assert main(["export", str(out)]) == 0
    capsys.readouterr()
    assert f"| fd_digits/student | {value:.6g} |" in (out / "pipeline" / "README.md").read_text()
    for garbage in (b"\xff\xfe not json", b"[1, 2]"):  # an unreadable metrics.json: a card without metrics
        (out / "metrics.json").write_bytes(garbage)
        assert main(["export", str(out)]) == 0
        assert "No metrics were recorded" in (out / "pipeline" / "README.md").read_text()
    capsys.readouterr()



def test_card_of_a_model_trained_from_data_names_no_teacher(tmp_path):
    encoder, tokenizer = tiny_clip(tmp_path)
    teacher = Teacher(tiny_text_unet().eval(), scheduler("epsilon", zero_snr=False), vae=tiny_vae().eval(),
                      text_encoder=encoder, tokenizer=tokenizer)
    export_generator(Generator.from_teacher(teacher.unet, teacher.schedule), teacher, tmp_path / "pipeline")
    # a teacher run's config still holds teacher.path: its default, never used by the run
    run_config = {"method": "teacher", "data": {"name": "digits_t2i"}, "teacher": {"path": "builtin:digits"}}
    write_model_card(tmp_path / "pipeline", run_config)
    card = ModelCard.load(tmp_path / "pipeline" / "README.md")
    assert card.data.base_model is None and "builtin:digits" not in card.text.split("## Training config")[0]
    assert card.text.lstrip().startswith("# teacher model trained on `digits_t2i`\n\nTrained with onestep: denoising")


def test_card_states_a_unit_variance_input(tmp_path):
    """A generator fed z itself (DMD2's SDXL student) says so: a user feeding sigma_t0 z would get other images."""
    encoder, tokenizer = tiny_clip(tmp_path)
    teacher = Teacher(tiny_text_unet().eval(), scheduler("epsilon", zero_snr=False), vae=tiny_vae().eval(),
                      text_encoder=encoder, tokenizer=tokenizer)
    generator = Generator.from_teacher(teacher.unet, teacher.schedule, timesteps=(399,), input_scaling="unit")
    export_generator(generator, teacher, tmp_path / "run" / "pipeline")
    write_model_card(tmp_path / "run" / "pipeline", {"method": "dmd2"})
    text = (tmp_path / "run" / "pipeline" / "README.md").read_text()
    assert "reads out at timesteps [399] from unit-variance noise z itself" in text and "sigma_t0 z (" not in text
    assert text == (tmp_path / "run" / "pipeline_diffusers" / "README.md").read_text()


def test_base_model_is_a_hub_id_never_a_path(tmp_path, monkeypatch, hub_cache, sd15_folder):
    from onestep.export.model_card import hub_id, teacher_label
    from tests.conftest import hub_snapshot

    snapshot = hub_snapshot(hub_cache, "tiny/sd15", sd15_folder)
    monkeypatch.chdir(sd15_folder.parent)
    assert hub_id(sd15_folder.name) is None  # a relative local path
    assert teacher_label(sd15_folder.name) == str(sd15_folder.resolve())
    assert hub_id("tiny/sd15") == "tiny/sd15" == hub_id(str(snapshot)) == teacher_label(str(snapshot))
    assert hub_id("builtin:digits") is None and teacher_label("builtin:digits") == "builtin:digits"
    assert hub_id(None) is None and teacher_label(None) == "a teacher built in memory"
