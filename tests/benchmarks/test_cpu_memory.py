"""The CPU's live-tensor peak (finetune/cpu_memory.py), and finetune's training memory against the plain-Trainer
peer on the same job, measured with it."""

import pytest
import torch

from benchmarks.cpu_memory import TensorPeak, live_tensor_bytes
from benchmarks.measure import TIMING_ENV, run_child, write_rows

MIB = 2**20


def test_tensor_peak_is_the_most_bytes_alive_at_once():
    held = torch.zeros(MIB // 4)  # 1 MiB alive before start: counted through live_tensor_bytes
    peak = TensorPeak().start()
    first = torch.ones(MIB)  # 4 MiB
    second = first * 2  # 8 MiB alive
    del first
    third = torch.ones(2 * MIB)  # 4 + 8 = 12 MiB alive: the peak
    del second, third
    fourth = torch.ones(MIB)  # 4 MiB: below the peak
    measured = peak.stop() * 2**30
    assert measured - peak.live_bytes == 12 * MIB
    assert peak.live_bytes >= held.untyped_storage().nbytes()
    del fourth


def test_live_tensor_bytes_counts_a_shared_storage_once():
    before = live_tensor_bytes()
    base = torch.zeros(MIB)
    views = [base[:10], base.view(-1, 4), base[5:]]  # noqa: F841 - alive while counting
    assert live_tensor_bytes() - before == 4 * MIB


@pytest.mark.slow  # two training processes per job on the tiny model
@pytest.mark.parametrize("ours, peer", [({"method": {"name": "full"}}, {"peer": "full"}),
                                        ({"method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0}},
                                         {"peer": "lora"})], ids=["full", "lora"])
def test_finetune_holds_no_tensor_the_plain_trainer_does_not(tiny_model_dir, tmp_path, ours, peer):
    data = tmp_path / "rows.jsonl"
    write_rows(data, 2 * 3, 32)
    common = {"model": str(tiny_model_dir), "data": str(data), "seq_len": 32, "batch": 2, "steps": 3,
              "galore_rank": 8, "gap": 200, "checkpointing": True, "tensor_peak": True}
    mine = run_child({**common, **ours, "out": str(tmp_path / "ours")}, TIMING_ENV)
    theirs = run_child({**common, **peer, "out": str(tmp_path / "peer")}, TIMING_ENV)
    assert "error" not in mine and "error" not in theirs, (mine.get("error"), theirs.get("error"))
    assert len(mine["step_seconds"]) == len(theirs["step_seconds"]) == 3
    # the same job through finetune's trainer and through plain transformers.Trainer: not one byte more
    assert mine["tensor_peak_gb"] <= theirs["tensor_peak_gb"], (
        (mine["tensor_peak_gb"] - theirs["tensor_peak_gb"]) * 2**30)
    assert mine["tensor_peak_gb"] > 0
