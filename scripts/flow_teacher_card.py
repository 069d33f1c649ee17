"""Write the card (README.md) of the miniature flow teacher, builtin:digits-flow: what it is, its parts as its folder
holds them, how it was trained (the run's config and metrics) and its guidance sweep (scripts/t2i_teacher_sweep.py's
JSON), so the card says what the shipped weights are and nothing typed by hand.

    python scripts/flow_teacher_card.py onestep/assets/digits_flow_teacher --run runs/flow_teacher \\
        --sweep runs/flow_teacher/sweep.json

Without --sweep the card says the sweep is still to run, and gives its command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onestep.files import atomic_file, read_json


SWEEP_COMMAND = ("python scripts/t2i_teacher_sweep.py builtin:digits-flow --steps 25 --guidance 1 1.25 1.5 2 "
                 "--num-samples 1000 --out runs/flow_teacher/sweep.json")
CARD_COMMAND = ("python scripts/flow_teacher_card.py onestep/assets/digits_flow_teacher --run runs/flow_teacher "
                "--sweep runs/flow_teacher/sweep.json")

FRONT = """---
library_name: diffusers
pipeline_tag: text-to-image
tags:
- onestep
- teacher
- flow-matching
- miniature-stable-diffusion-3
---

# digits-flow: a miniature flow-matching transformer (`builtin:digits-flow`)

A latent, text-conditioned, flow-matching transformer in Stable Diffusion 3's layout, trained on CPU on the 32x32
coloured digits with captions (`data.name: digits_t2i`: the data, captions, evaluator and metrics of the miniature
Stable Diffusion `builtin:digits-t2i`, docs/t2i.md), so that every distillation method is measured on a flow
transformer as on a UNet, on the same terms. A stock diffusers folder, no custom code:

```python
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained("onestep/assets/digits_flow_teacher")
image = pipe("a yellow seven", num_inference_steps=25, guidance_scale=1.25, max_sequence_length=16,
             height=32, width=32).images[0]
```

`max_sequence_length=16`: the pipeline's default 256 pads T5's input to 256 tokens, a sequence the teacher never saw
(it trained on its tokenizer's 16); its T5 tokenizer allows 16 (`model_max_length`), and diffusers would warn and
truncate anyway. 32x32 is also the pipeline's default here (sample size 8 x the VAE's factor 4).
"""

LAYOUT = """## Why Stable Diffusion 3's layout, not FLUX's

- **True classifier-free guidance**, as the miniature SD: an empty negative prompt and a guidance scale at sampling,
  so both teachers' guidance sweeps and every method's guided real score compare on the same terms. FLUX.1-dev's
  guidance is *embedded* (a transformer input, no negative branch): a teacher trained from scratch would first have
  to be distilled into that embedding, a method of its own.
- **T5 is optional** in SD3 (CLIP-L + CLIP-G carry the pooled and per-token condition; zeros without T5), so the
  caption words fit small random encoders; FLUX needs T5 for all of its per-token text.
- **The 4-channel VAE fits**: SD3's transformer takes any latent channel count in 1x1 patches, so the miniature SD's
  VAE is reused with SD3's shift and scale measured on the data; FLUX packs 2x2 latent patches of a 16-channel VAE
  into 64-wide tokens, which needs a new VAE (or a packing that no longer matches its published pipeline).
"""


def _mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 2**20


def _clip(config: dict) -> str:
    return (f"{config['architectures'][0]}, {config['num_hidden_layers']} layers, width {config['hidden_size']}, "
            f"projection {config.get('projection_dim')}")


def parts_table(teacher: Path) -> str:
    """The folder's parts, read from their configs."""
    tf = read_json(teacher / "transformer" / "config.json")
    vae = read_json(teacher / "vae" / "config.json")
    sched = read_json(teacher / "scheduler" / "scheduler_config.json")
    t5 = read_json(teacher / "text_encoder_3" / "config.json")
    t5_tokens = read_json(teacher / "tokenizer_3" / "tokenizer_config.json").get("model_max_length")
    clip_tokens = read_json(teacher / "tokenizer" / "tokenizer_config.json").get("model_max_length")
    width = tf["num_attention_heads"] * tf["attention_head_dim"]
    tokens = (tf["sample_size"] // tf["patch_size"]) ** 2
    rows = [
        ("transformer/", f"SD3Transformer2DModel: {tf['num_layers']} joint blocks, width {width} "
                         f"({tf['num_attention_heads']} heads of {tf['attention_head_dim']}), "
                         f"{tf['in_channels']}-channel {tf['sample_size']}x{tf['sample_size']} latents in "
                         f"{tf['patch_size']}x{tf['patch_size']} "
                         f"patches ({tokens} image tokens), joint attention width {tf['joint_attention_dim']}, "
                         f"q/k norm {tf.get('qk_norm')}; velocity prediction"),
        ("scheduler/", f"FlowMatchEulerDiscreteScheduler: {sched['num_train_timesteps']} steps, shift "
                       f"{sched.get('shift')} (SD3 scales its shift with resolution, 3.0 at 1024^2; at 64 tokens both "
                       "SD3's and FLUX's rules give about the unshifted base)"),
        ("vae/", f"the miniature SD's AutoencoderKL (32x32x3 -> 8x8x{vae['latent_channels']}, blocks "
                 f"{tuple(vae['block_out_channels'])}), with SD3's latent normalisation measured on the data: "
                 f"shift_factor {vae['shift_factor']:.4f} (the mean of the posterior means), scaling_factor "
                 f"{vae['scaling_factor']:.4f} (1 / std of the shifted posterior samples)"),
        ("text_encoder/", f"CLIP-L in miniature: {_clip(read_json(teacher / 'text_encoder' / 'config.json'))}"),
        ("text_encoder_2/", f"CLIP-G in miniature: {_clip(read_json(teacher / 'text_encoder_2' / 'config.json'))}"),
        ("text_encoder_3/", f"T5 in miniature: {t5['architectures'][0]}, {t5['num_layers']} layer, d_model "
                            f"{t5['d_model']} (the transformer's joint attention width)"),
        ("tokenizer/, tokenizer_2/", "the caption tokenizer (onestep/data/caption_tokenizer.py: every caption word "
                                     f"is one token), max length {clip_tokens}"),
        ("tokenizer_3/", f"T5 tokenizer over the caption words, max length {t5_tokens}"),
    ]
    lines = ["| part | what |", "|---|---|", *[f"| `{name}` | {what} |" for name, what in rows]]
    lines += ["", "The text encoders are random (seeds s, s + 1, s + 2 from `options.text_encoder_seed`, 0 in "
              "configs/flow/teacher.yaml) and frozen; CLIP-L's and CLIP-G's pooled projections side by "
              "side are SD3's pooled condition, their penultimate states and T5's the token condition. Weights: "
              f"{_mb(teacher):.1f} MB in all (transformer and VAE float16, text encoders float32)."]
    return "\n".join(lines) + "\n"


def training_section(run: Path | None) -> str:
    head = "## Training\n\n"
    if run is None:
        return head + ("`onestep train configs/flow/teacher.yaml` (velocity loss at t uniform on the shifted grid, "
                       "captions dropped to the empty prompt 10% of the time, EMA 0.999); this card was written "
                       "without the run's folder, so its steps and time are not stated here.\n")
    config, metrics = read_json(run / "config.json"), read_json(run / "metrics.json")
    options, data = config["options"], config["data"]
    final = metrics.get("final") or {}
    lines = [head + f"`onestep train configs/flow/teacher.yaml`: {metrics['step']:,} steps at batch "
             f"{data['batch_size']} in {metrics['train_seconds'] / 60:.0f} minutes (stopped by "
             f"`train.max_steps={config['train']['max_steps']}` or `train.max_minutes="
             f"{json.dumps(config['train']['max_minutes'])}`, whichever came first), lr "
             f"{options['optimizer']['lr']:g}, EMA {options['ema_decay']}, captions dropped to the empty prompt "
             f"{options['label_dropout']:.0%} of the time; velocity loss at t uniform on the shifted grid. "
             "`samples.png`: the grid prompts (a row per digit: four colours, then four uncoloured) after 25 guided "
             "Euler steps."]
    if final:  # the trainer's evaluation: the guided teacher at options.eval_steps
        steps, guidance = options["eval_steps"], options["eval_guidance"]
        # runs before Euler rows were labelled as such named them teacher_ddim{steps}
        scores = ", ".join(f"{k.split('/')[0]} {v:.3f}" for k, v in final.items() if isinstance(v, float)
                           and k.split("/")[-1] in (f"teacher_euler{steps}", f"teacher_ddim{steps}"))
        lines.append(f"\nIts end-of-training evaluation ({config['eval']['num_samples']} samples, {steps} Euler "
                     f"steps, guidance {guidance:g}): {scores}.")
    return "\n".join(lines) + "\n"


DIGIT_TARGET = 0.95  # issue 16's digit-accuracy target, the best-scale rule of the miniature SD's card
SWEEP_COLUMNS = (("fd_t2i", "FD-t2i"), ("digit_acc", "digit acc"), ("colour_acc", "colour acc"),
                 ("colour_balance", "colour balance"), ("images_per_s", "images/s"))


def sweep_section(sweep: dict | None) -> str:
    head = "## Guidance sweep (Euler steps on the flow schedule)\n\n"
    if sweep is None:
        return head + (f"Not measured yet. The command (N = 1000 samples of `eval_prompts(1000)` from fixed noise, "
                       f"seed 1234; one JSON row per steps and scale):\n\n```\n{SWEEP_COMMAND}\n{CARD_COMMAND}\n```\n")
    lines = [head + f"`python scripts/t2i_teacher_sweep.py {sweep['teacher']} ...` ({sweep['num_samples']} samples): "
             f"{sweep['protocol']}", ""]
    lines += ["| steps | guidance | " + " | ".join(name for _, name in SWEEP_COLUMNS) + " |",
              "|---" * (2 + len(SWEEP_COLUMNS)) + "|"]
    for row in sweep["rows"]:
        lines.append(f"| {row['steps']} | {row['guidance']:g} | "
                     + " | ".join(f"{row[key]:.3f}" for key, _ in SWEEP_COLUMNS) + " |")
    most = max(row["steps"] for row in sweep["rows"])
    fit = [row for row in sweep["rows"] if row["steps"] == most and row["digit_acc"] >= DIGIT_TARGET]
    if fit:
        best = min(fit, key=lambda row: row["fd_t2i"])
        lines += ["", f"Best scale at {most} steps: **{best['guidance']:g}**, the lowest FD-t2i among the scales with "
                  f"digit accuracy >= {DIGIT_TARGET} (the miniature SD's rule); the configs' `teacher.guidance_scale` "
                  "follows it. The teacher at 4, 10 and 25 steps of that scale, under both t2i judges, is "
                  "`teacher_rows.json` (`python scripts/teacher_rows.py flow`; docs/results/flow.md)."]
    else:
        lines += ["", f"No scale at {most} steps reaches digit accuracy {DIGIT_TARGET}."]
    return "\n".join(lines) + "\n"


FOOT = """## Use in onestep

`teacher.path: builtin:digits-flow` in configs/flow/{dmd2,sid,sida,sfd,msd,disback,boot}.yaml; `make demo-flow`
distills it with DMD2 for 15 minutes and prints the table against this teacher at 4, 10 and 25 guided Euler steps
(scripts/t2i_table.py). The one-step student starts at t = 1 (grid time 999) and reads out x0 = z - v (docs/flow.md).
`teacher_rows.json` (when present) holds this teacher's rows of that table, written by
`python scripts/teacher_rows.py flow` and read instead of resampling (docs/bench.md).

Evaluator: onestep/assets/digits_t2i_classifier (held-out digit accuracy 99.0%, colour 100%).
"""


def card_text(teacher: Path, run: Path | None = None, sweep: dict | None = None) -> str:
    return "\n".join([FRONT, LAYOUT, "## Parts\n\n" + parts_table(teacher), training_section(run),
                      sweep_section(sweep), FOOT])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path)
    parser.add_argument("--run", type=Path, help="the teacher's training run (its config.json and metrics.json)")
    parser.add_argument("--sweep", type=Path, help="scripts/t2i_teacher_sweep.py's --out JSON")
    parser.add_argument("--out", type=Path, help="default: TEACHER/README.md")
    args = parser.parse_args(argv)
    sweep = json.loads(args.sweep.read_text()) if args.sweep else None
    with atomic_file(args.out or args.teacher / "README.md") as f:
        f.write(card_text(args.teacher, args.run, sweep).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
