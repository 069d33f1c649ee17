"""What the package ships: the digits teacher and classifier load from safetensors and stay in sync with the code."""

from pathlib import Path

import pytest
import torch

from onestep.models.conditioning import Condition
from onestep.models.loading import resolve_path
from onestep.models.teacher import Teacher


PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def test_shipped_teacher_loads_and_is_what_the_configs_promise():
    teacher = Teacher.from_pretrained("builtin:digits")
    assert teacher.num_classes == 10 and teacher.sample_shape == (1, 8, 8)
    assert teacher.schedule.prediction_type == "v_prediction"
    assert teacher.schedule.alphas_cumprod[-1] == 0  # zero terminal SNR
    assert next(teacher.unet.parameters()).dtype == torch.float32  # stored in float16, loaded as float32
    folder = resolve_path("builtin:digits")
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    x0 = teacher.x0(torch.randn(2, 1, 8, 8), torch.tensor([999, 999]), Condition(class_labels=torch.tensor([3, 7])))
    assert x0.shape == (2, 1, 8, 8) and x0.abs().max() < 3


def test_shipped_pipeline_file_matches_the_source():
    shipped = resolve_path("builtin:digits") / "pipeline_class_conditional.py"
    assert shipped.read_text() == (PIPELINES / "pipeline_class_conditional.py").read_text()


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_validates(path):
    from onestep.config import load_config

    cfg = load_config(path)
    assert cfg.method and cfg.output_dir


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_are_accelerate_configs(path):
    """configs/accelerate/ holds `accelerate launch --config_file` files, not run configs: accelerate reads them."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.distributed_type.value.lower() == path.stem.split("_")[0]  # fsdp.yaml, deepspeed_zero2.yaml
