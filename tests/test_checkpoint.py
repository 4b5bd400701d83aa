"""Checkpoints: atomic writes, checksum sidecar, weights_only loads, clear errors."""

import os
import pickle

import pytest
import torch

from pyro_vae.checkpoint import load_checkpoint, save_checkpoint
from pyro_vae.errors import CheckpointError


def payload():
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "progress": {"epoch": 3, "step": 12}, "name": "x"}


def test_round_trip_and_sidecar(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", payload())
    assert (tmp_path / "last.pt.sha256").read_text().split()[1] == "last.pt"
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded["model"]["w"], payload()["model"]["w"])
    assert loaded["progress"] == {"epoch": 3, "step": 12}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_flipped_byte_is_detected(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", payload())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"last\.pt \(\d+ bytes\) fails its checksum"):
        load_checkpoint(path)


def test_empty_truncated_and_foreign_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"\(0 bytes\) is empty"):
        load_checkpoint(tmp_path / "empty.pt")
    path = save_checkpoint(tmp_path / "t.pt", payload())
    path.write_bytes(path.read_bytes()[:100])
    (tmp_path / "t.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_checkpoint(path)
    torch.save({"a": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a pyro_vae checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


class _Marker:
    def __reduce__(self):
        return (open, (str(_Marker.path), "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    _Marker.path = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format_version": 1, "x": _Marker()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused|not a checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not _Marker.path.exists()


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", payload())
    good = path.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom while writing")

    with pytest.raises(CheckpointError, match="previous file is kept"):
        save_checkpoint(path, {"bad": Unsaveable()})
    assert path.read_bytes() == good
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
