"""Two-stage training: a later stage starts from an earlier stage's generator and, optionally, its critic.

DMD2's GAN stage reloads both the generator and the fake score of its first stage (tianweiy/DMD2,
`--ckpt_only_path`); `init_generator` takes the generator from an exported pipeline, `init_critic` the fake score
(and GAN head, if the earlier stage had one) from a weights file (the composition root finds it in a run folder's
newest complete checkpoint: methods know no checkpoint files).
"""

from __future__ import annotations

from pathlib import Path

from onestep.errors import UserInputError
from onestep.files import read_json


def init_generator(generator, pipeline_dir: Path) -> None:
    """Load an exported OneStepPipeline's UNet into `generator`, strictly; its read-out timesteps and input scaling
    must match."""
    from onestep.models.loading import load_model
    from onestep.models.lora import merged_folder_adapter
    from onestep.models.unet import load_weights

    index = pipeline_dir / "model_index.json"
    if not index.is_file():
        raise UserInputError(f"init_generator {pipeline_dir} is not an exported pipeline folder (no model_index.json)")
    config = read_json(index)
    timesteps = config.get("timesteps")
    if timesteps != generator.timesteps:
        raise UserInputError(f"init_generator {pipeline_dir} reads out at timesteps {timesteps} but this run's "
                             f"generator at {generator.timesteps}")
    input_scaling = config.get("input_scaling", "sigma")
    if input_scaling != generator.input_scaling:
        raise UserInputError(f"init_generator {pipeline_dir} was trained on input_scaling {input_scaling} noise but "
                             f"this run's generator takes {generator.input_scaling} (options.generator_input)")
    unet = merged_folder_adapter(load_model(pipeline_dir / "unet"), pipeline_dir)
    try:
        load_weights(generator.unet, unet.state_dict(), strict=True)
    except RuntimeError:
        raise UserInputError(f"init_generator {pipeline_dir}: its UNet does not match the teacher's "
                             "architecture") from None


def init_critic(fake, path: Path) -> None:
    """Load an earlier run's fake score (its weights file, found by the caller in that run's newest checkpoint) into
    `fake` (a FakeScore): its UNet strictly; a GAN head the earlier stage did not train (stage 1 without the GAN term)
    keeps its fresh initialisation."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from onestep.models.unet import load_weights

    try:
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserInputError(f"init_critic {path}: {str(err).splitlines()[0]}") from None
    try:
        missing, unexpected = load_weights(fake, state, strict=False)
    except RuntimeError:  # a shape mismatch
        missing, unexpected = ["(shapes)"], []
    if unexpected or any(not key.startswith("head.") for key in missing):
        raise UserInputError(f"init_critic {path}: its fake score does not match this run's (another teacher "
                             "architecture, or LoRA adapters)")
