"""The CLI starts without torch, diffusers or transformers: `--help`, `CMD --help` and argument errors answer from
argparse and the standard library (each command imports the heavy libraries only once it needs them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


HEAVY = ("torch", "diffusers", "transformers", "accelerate")


def heavy_after(code: str) -> tuple[list[str], str]:
    """(the heavy libraries in sys.modules after running `code` in a fresh interpreter, that run's stderr)."""
    probe = f"import sys\n{code}\nprint(__import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_import_onestep_cli_is_light():
    assert heavy_after("import onestep.cli") == ([], "")


def test_import_onestep_is_light_and_its_public_names_load_on_use():
    assert heavy_after("import onestep\nassert 'Teacher' in dir(onestep)") == ([], "")
    import onestep
    from onestep.training.trainer import Trainer

    assert onestep.Trainer is Trainer
    with pytest.raises(AttributeError, match="no attribute 'Teachr'"):
        onestep.Teachr  # noqa: B018


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["train", "--help"], 0),
    (["bench", "--help"], 0),
    (["trian", "x.yaml"], 2),  # argparse: unknown command
    (["sample", "folder", "--out", "grid.png", "--num-images", "0"], 2),
    (["sample", "folder", "--out", "grid.jpg"], 2),
    (["fid"], 2),  # no SOURCE and no --save-stats
    (["fid", "x.npz", "--features", "none"], 2),  # none without --metrics
    (["bench", "--out", "table"], 2),  # no run folder
])
def test_help_and_argument_errors_import_no_heavy_library(argv, code):
    run = (f"from onestep.cli import main\ntry:\n    code = main({argv!r})\n"
           f"except SystemExit as e:\n    code = e.code\nassert code == {code}, code")
    loaded, stderr = heavy_after(run)
    assert loaded == [], argv
    if code == 2:
        assert len(stderr.strip().splitlines()) <= 2 and "Traceback" not in stderr, stderr  # argparse: usage + error
