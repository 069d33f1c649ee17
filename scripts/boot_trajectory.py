"""How closely a BOOT student's y_t follows the teacher's DDIM trajectory from the same noise, at each grid t.

    OMP_NUM_THREADS=1 python scripts/boot_trajectory.py runs/boot --num-samples 500

Prints one JSON line: the mean squared error per t (images in [-1, 1]) and, for scale, the teacher's y_t variance.
"""

import argparse
import json
from pathlib import Path

import torch

from onestep.distillers.boot import SignalGenerator, training_grid, trajectory_gap
from onestep.eval.sampling import balanced_labels
from onestep.models.conditioning import Condition
from onestep.models.loading import load_model
from onestep.models.teacher import Teacher
from onestep.runs import RUN_CONFIG


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished boot run folder (config.json, pipeline/)")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = json.loads((Path(args.run) / RUN_CONFIG).read_text())
    teacher = Teacher.from_pretrained(config["teacher"]["path"], guidance_scale=config["teacher"]["guidance_scale"])
    student = SignalGenerator(load_model(Path(args.run) / "pipeline" / "unet"), teacher.schedule).eval()
    grid = training_grid(config["options"]["num_grid_steps"], teacher.schedule.num_train_timesteps)
    torch.manual_seed(args.seed)
    noise = torch.randn(args.num_samples, *teacher.sample_shape)
    labels = balanced_labels(args.num_samples, teacher.num_classes) if teacher.num_classes else None
    gap = trajectory_gap(student, teacher, noise, Condition(class_labels=labels), grid)
    print(json.dumps({"run": args.run, "num_samples": args.num_samples, "mse_by_t": gap}))


if __name__ == "__main__":
    main()
