"""VAE training (`method: vae`): a latent teacher's AutoencoderKL from the run's images, held in memory."""

from __future__ import annotations

from onestep.tasks.ingredients import load_real_data
from onestep.tasks.registry import RunSettings, TaskKind, register_task
from onestep.training.vae_task import VaeOptions, VaeTraining


def build_vae_task(cfg: RunSettings) -> VaeTraining:
    return VaeTraining(cfg.options, load_real_data(cfg)[0], cfg.data.batch_size)


register_task(TaskKind("vae", methods=lambda: ("vae",), options=lambda method: VaeOptions, build=build_vae_task))
