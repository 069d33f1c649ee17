"""The text path's kill -9 campaign (scripts/kill_campaign.py), short: one SIGKILL during the latent cache build, one
during training and one during the export of `onestep train configs/t2i/dmd2.yaml` (GAN on, reading the cache), then
reruns to the end: the cache, the final checkpoint and both exports are byte-identical to an uninterrupted run's.

Each run is a forked copy of this process running the CLI's `main` (the imports are done once), killed by its pid."""

import multiprocessing
import os
import sys

import pytest

from scripts.kill_campaign import campaign


class Forked:
    """One `onestep train` run in a forked child, with the Popen methods the campaign uses."""

    def __init__(self, cmd: list[str]):
        from onestep.cli import main

        self.process = multiprocessing.get_context("fork").Process(target=lambda: sys.exit(main(cmd[3:])))
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode


@pytest.mark.slow  # ~12 s alone, 41 s on the shared 2-core machine at load 7.6
def test_kill_9_during_cache_build_training_and_export_loses_nothing(tmp_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    result = campaign(tmp_path, kills=1, images=8, steps=4, batch=2, shard=2, launch=Forked, log=lambda line: None)
    assert result["kills"] == {"cache": 1, "training": 1, "export": 1}, result
    assert result["identical"] and result["max_abs_delta_weight"] == 0.0, result
    assert result["files_compared"] >= 4 + 1 + 2 + 2, result  # shards, index, checkpoint models, exported UNets


@pytest.mark.slow  # one 2-process run: ~45 s on the shared 2-core machine
def test_a_dead_rank_ends_the_other_in_seconds_with_one_line(tmp_path):
    from scripts.kill_campaign import kill_one_rank

    result = kill_one_rank(tmp_path / "run", rank=1, steps=40, kill_after=7)
    # gloo's connection to the dead process resets at once; torchrun's agent (0.1 s monitor) ends the rest
    assert result["survivor_exit_s"] < 15, result
    assert len(result["lines"]) == 1, result
    assert result["lines"][0].startswith("onestep train: stopped: process 0: another process of this run is gone")
    assert "the last complete checkpoint is" in result["lines"][0] and result["resumed_from"] >= 5
