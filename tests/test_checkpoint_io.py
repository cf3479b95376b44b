"""Checkpoint I/O: weights-only loading with clear errors, atomic writes, stale temp-file cleanup."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from mmcv.models.utils.checkpoint_io import (CheckpointError, atomic_torch_save, atomic_write, atomic_write_json,
                                             load_checkpoint_file, remove_stale_temp_files, state_dict_of,
                                             temp_path_for)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_round_trip_and_module_prefix(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_torch_save({"state_dict": {"module.w": torch.ones(2)}, "meta": {"iter": 3}}, path)
    loaded = load_checkpoint_file(path)
    assert loaded["meta"] == {"iter": 3}
    assert list(state_dict_of(loaded, str(path))) == ["w"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]


def test_pickled_objects_are_refused_and_the_file_is_named(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        torch.save({"x": _Evil()}, handle)
    with pytest.raises(pickle.UnpicklingError, match="evil.pth: refused to unpickle"):
        load_checkpoint_file(path)


@pytest.mark.parametrize("content, reason", [
    (b"", r"the file is empty \(0 bytes"),
    (b"this is text\n", r"not a torch checkpoint \(starts with b'this', expected a zip archive"),
    (b"PK\x03\x04truncated", r"truncated or corrupted \(13 bytes"),
])
def test_unreadable_files_raise_one_checkpoint_error_saying_why(tmp_path, content, reason):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pth: " + reason):
        load_checkpoint_file(path)


def test_truncated_checkpoint_raises_checkpoint_error(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_checkpoint_file(cut)


def test_state_dict_of_rejects_non_dicts():
    with pytest.raises(CheckpointError, match="x.pth: expected a dict"):
        state_dict_of(torch.zeros(3), "x.pth")
    with pytest.raises(CheckpointError, match="'state_dict' must be a dict"):
        state_dict_of({"state_dict": [1, 2]}, "y.pth")


def test_failed_write_leaves_neither_target_nor_temp_file(tmp_path):
    target = tmp_path / "out.json"

    def explode(handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, explode)
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})
    assert target.read_text().strip() == '{\n  "a": 1\n}'
    assert os.listdir(tmp_path) == ["out.json"]


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / ".iter_4.pth.tmp.{}".format(dead_pid)
    stale.write_bytes(b"half")
    live = tmp_path / os.path.basename(temp_path_for(tmp_path / "latest.pth"))
    live.write_bytes(b"being written")
    unrelated = tmp_path / "notes.tmp.txt"
    unrelated.write_text("keep")
    removed = remove_stale_temp_files(tmp_path)
    assert removed == [str(stale)]
    assert live.exists() and unrelated.exists() and not stale.exists()
