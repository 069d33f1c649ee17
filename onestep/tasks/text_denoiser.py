"""Text-to-image teacher training (`method: teacher` on `data.name: digits_t2i`): the miniature Stable Diffusion's
UNet on its captioned coloured digits, judged on its fixed eval prompts."""

from __future__ import annotations

from onestep.errors import UserInputError
from onestep.tasks.ingredients import build_judge, use_attention
from onestep.tasks.registry import RunSettings, TaskKind, register_task
from onestep.training.denoiser_task import DenoiserOptions
from onestep.training.text_denoiser_task import TextDenoiserTraining


def build_text_denoiser_task(cfg: RunSettings) -> TextDenoiserTraining:
    from onestep.data.digits_t2i import caption_vocabulary, digits_t2i_tokenizer, load_digits_t2i

    data = load_digits_t2i()
    try:
        task = TextDenoiserTraining(cfg.options, data.images, data.captions, cfg.data.batch_size,
                                    digits_t2i_tokenizer(), build_judge(cfg, None, is_text=True),
                                    words=tuple(w for w in caption_vocabulary() if w.isalpha()))
    except ValueError as err:
        raise UserInputError(str(err)) from None
    use_attention(task, cfg.attention)
    return task


register_task(TaskKind("text_denoiser", methods=lambda: ("teacher",), options=lambda method: DenoiserOptions,
                       build=build_text_denoiser_task, data=("digits_t2i",)))
