"""A full disk while `onestep train` writes a checkpoint, the exported `pipeline/` or its stock `pipeline_diffusers/`
(a text-to-image student of the miniature SD): one line, exit code 2, and the last checkpoint and the previous
exports are left exactly as they were."""

import errno
import shutil
from pathlib import Path

import pytest

from onestep.cli import main
from onestep.training.checkpoints import verified_checkpoint
from tests.conftest import TINY_PAIRS


def overrides(out: Path, max_steps: int) -> list[str]:
    return ["configs/t2i/dmd2.yaml", f"output_dir={out}", f"train.max_steps={max_steps}", "train.max_minutes=null",
            "train.checkpoint_every=2", "data.batch_size=2", "eval.num_samples=4", "eval.features=none",
            "eval.metrics=[]", *TINY_PAIRS]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(["train", *overrides(out, 2)]) == 0
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and "checkpoint" not in p.parent.name} | {p.name: b"" for p in (folder / "checkpoints").iterdir()}


def fill_disk_after(monkeypatch, module, name: str, calls: int) -> None:
    """`module.name` works `calls` times, then writes half of what it was given and fails as a full disk does."""
    original, seen = getattr(module, name), []

    def full(*args, **kwargs):
        seen.append(1)
        if len(seen) <= calls:
            return original(*args, **kwargs)
        Path(args[1]).write_bytes(b"\0" * 100)  # half-written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, name, full)


@pytest.mark.parametrize("where", ["checkpoint", "pipeline", "pipeline_diffusers"])
def test_disk_full_keeps_the_last_checkpoint_and_exports(tmp_path, finished_run, monkeypatch, capsys, where):
    import accelerate.utils.other
    import safetensors.torch

    import onestep.export.stock

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    assert (out / "pipeline_diffusers" / "model_index.json").is_file()
    before = snapshot(out)
    if where == "checkpoint":  # accelerate: the generator is written, the critic fails
        fill_disk_after(monkeypatch, accelerate.utils.other, "safe_save_file", 1)
    elif where == "pipeline":  # diffusers' save_pretrained: the UNet is written, then the next component fails
        fill_disk_after(monkeypatch, safetensors.torch, "save_file", 1)
    else:  # the stock folder copies the components where hard links are refused
        fill_disk_after(monkeypatch, onestep.export.stock, "link_or_copy", 2)
    capsys.readouterr()
    assert main(["train", *overrides(out, 4)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("onestep") and not line.startswith("onestep: resumed from")]
    assert len(err) == 1 and "No space left on device" in err[0], err
    step = 2 if where == "checkpoint" else 4
    assert verified_checkpoint(out / "checkpoints") == (out / "checkpoints" / f"checkpoint-{step:07d}", [])
    after = snapshot(out)
    if where != "checkpoint":  # the new checkpoint 4 replaced 2; everything else is untouched
        before = {k: v for k, v in before.items() if k != "checkpoint-0000002"} | {"checkpoint-0000004": b""}
    for name in ("log.jsonl", "config.json"):  # the new run's own, both written before the failure
        after.pop(name), before.pop(name)
    assert after == before
