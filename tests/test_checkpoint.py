"""Checkpoints: atomic writes, checksum sidecar, weights_only loads, rotation, clear errors, and kills mid-write."""

import ast
import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_vae.checkpoint import (
    CheckpointDir,
    atomic_write_bytes,
    chain_names,
    load_checkpoint,
    save_checkpoint,
    sha256_of,
)
from pyro_vae.errors import CheckpointError, ConfigError


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


# ------------------------------------------------------------------------------------------------------- rotation


def saved(path):
    return load_checkpoint(path)["progress"]["step"]


def step_payload(step):
    return {"model": {"w": torch.full((3,), float(step))}, "progress": {"epoch": 0, "step": step}}


def test_rotation_keeps_last_and_previous(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep_last=2)
    assert ckpts.latest() is None
    for step in range(1, 4):
        assert ckpts.save(step_payload(step)) == tmp_path / "last.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.prev.pt",
        "last.prev.pt.sha256",
        "last.pt",
        "last.pt.sha256",
    ]
    assert (saved(tmp_path / "last.pt"), saved(tmp_path / "last.prev.pt")) == (3, 2)
    assert (tmp_path / "last.prev.pt.sha256").read_text().split() == [
        sha256_of(tmp_path / "last.prev.pt"),
        "last.prev.pt",
    ]
    assert ckpts.latest() == tmp_path / "last.pt"


def test_keep_last_one_and_three(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep_last=3)
    for step in range(1, 6):
        ckpts.save(step_payload(step))
    assert [saved(p) for p in ckpts.existing()] == [5, 4, 3]
    assert [p.name for p in ckpts.existing()] == chain_names(3) == ["last.pt", "last.prev.pt", "last.prev2.pt"]
    # A later run with a smaller keep_last drops what lies beyond it.
    CheckpointDir(tmp_path, keep_last=1).save(step_payload(6))
    assert [p.name for p in CheckpointDir(tmp_path).existing()] == ["last.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]
    with pytest.raises(ConfigError, match="keep_last must be a positive integer, got 0"):
        CheckpointDir(tmp_path, keep_last=0)


def test_latest_falls_back_when_a_crash_fell_inside_the_rotation(tmp_path, caplog):
    ckpts = CheckpointDir(tmp_path)
    ckpts.save(step_payload(1))
    ckpts.save(step_payload(2))
    # The state a kill between the shift and the final rename leaves: last.pt gone, last.prev.pt complete.
    (tmp_path / "last.pt").unlink()
    (tmp_path / "last.pt.sha256").unlink()
    assert ckpts.latest() == tmp_path / "last.prev.pt"
    assert "last.pt is missing" in caplog.text
    ckpts.save(step_payload(3))
    assert [saved(p) for p in ckpts.existing()] == [3, 1]


def test_stale_temp_files_are_cleaned(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    ckpts.save(step_payload(1))
    (tmp_path / ".tmp-last.pt.abc123").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt").write_text("mine")
    assert [p.name for p in ckpts.clean_temp_files()] == [".tmp-last.pt.abc123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256", "notes.txt"]


def test_a_damaged_checkpoint_points_to_the_previous_good_one(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    ckpts.save(step_payload(1))
    ckpts.save(step_payload(2))
    last = tmp_path / "last.pt"
    data = bytearray(last.read_bytes())
    data[100] ^= 0x01
    last.write_bytes(bytes(data))
    size = len(data)
    prev = tmp_path / "last.prev.pt"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(last)
    message = str(info.value)
    assert f"checkpoint {last} ({size} bytes) fails its checksum" in message
    assert f"the previous checkpoint {prev} ({prev.stat().st_size} bytes) verifies" in message
    assert f"resume from it with --resume {prev}" in message
    assert "\n" not in message
    # Truncated and empty files get the same pointer.
    last.write_bytes(bytes(data[: size // 2]))
    (tmp_path / "last.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match=r"truncated or not a checkpoint .*last\.prev\.pt .* verifies"):
        load_checkpoint(last)
    last.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"\(0 bytes\) is empty; the previous checkpoint"):
        load_checkpoint(last)
    prev.write_bytes(b"also broken")
    with pytest.raises(CheckpointError, match="no older checkpoint of this run verifies"):
        load_checkpoint(last)


def test_missing_sidecar_loads_with_a_warning(tmp_path, caplog):
    path = save_checkpoint(tmp_path / "last.pt", payload())
    (tmp_path / "last.pt.sha256").unlink()
    assert load_checkpoint(path)["name"] == "x"
    assert "no .sha256 sidecar" in caplog.text


def test_only_plain_values_are_written(tmp_path):
    class Version(str):
        pass

    with pytest.raises(CheckpointError, match=r"value at versions\.torch is a Version; only tensors and plain"):
        save_checkpoint(tmp_path / "a.pt", {"versions": {"torch": Version("2.0")}})
    with pytest.raises(CheckpointError, match=r"value at x\[1\] is a set"):
        CheckpointDir(tmp_path).save({"x": [1, {2}]})
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------------ full disk


def test_a_full_disk_is_a_clear_error_that_keeps_the_previous_file(tmp_path):
    path = save_checkpoint(tmp_path / "config.json", {"a": 1})
    before = path.read_bytes()

    def write_until_full(f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError, match=r"no space left while writing .*config\.json .*previous file is kept"):
        atomic_write_bytes(path, write_until_full)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "config.json.sha256"]


# A real write failure, not a simulated one: RLIMIT_FSIZE makes the kernel refuse writes past the limit (EFBIG, the
# same path as ENOSPC), which needs no root and no special file system. SIGXFSZ is ignored so that write() fails
# instead of killing the process.
FULL_DISK_SCRIPT = """
import resource, signal, sys, torch
from pyro_vae.checkpoint import CheckpointDir
from pyro_vae.errors import CheckpointError
ckpts = CheckpointDir(sys.argv[1])
ckpts.save({"w": torch.zeros(1000), "progress": {"step": 1}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
try:
    ckpts.save({"w": torch.zeros(1_000_000), "progress": {"step": 2}})
except CheckpointError as err:
    print(err)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE and SIGXFSZ (POSIX)")
def test_a_real_write_failure_keeps_the_previous_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert re.match(
        rf"no space left while writing {re.escape(str(tmp_path / 'last.pt'))} \(4\d{{6}} bytes needed; ", message
    )
    assert "File too large" in message
    assert f"the previous checkpoints are kept: free some space, then resume with --resume {tmp_path}" in message
    assert saved(tmp_path / "last.pt") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


# ----------------------------------------------------------------------------------------------- killed mid-write

KILL_DURING_WRITE_SCRIPT = """
import sys, torch
from pyro_vae.checkpoint import CheckpointDir
ckpts = CheckpointDir(sys.argv[1])
ckpts.save({"w": torch.zeros(10), "progress": {"step": 1}})
print("first saved", flush=True)
ckpts.save({"w": torch.zeros(32 * 2**20), "progress": {"step": 2}})  # 128 MiB: a write long enough to be caught
print("second saved", flush=True)
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_file_loadable(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_WRITE_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "first saved"
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        assert proc.poll() is None, "the second write finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # the temp file exists: the second checkpoint is being written
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    ckpts = CheckpointDir(tmp_path)
    assert ckpts.latest() == tmp_path / "last.pt" and saved(tmp_path / "last.pt") == 1
    assert len(ckpts.clean_temp_files()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


# A helper process imports torch once and forks one writer per kill (a fresh interpreter per kill would spend ~2 s
# importing torch each time). Each writer saves checkpoints in a loop; the helper waits until a temp file is being
# written, SIGKILLs the writer within the next millisecond (inside the write, or just after it, in the renames of
# the rotation), and then loads every checkpoint file left. The same loop against a plain in-place torch.save, killed
# at random moments, shows that the check does catch torn files.
KILL_LOOP_SCRIPT = """
import json, os, random, signal, sys, time, torch
from pathlib import Path
from pyro_vae.checkpoint import CheckpointDir, load_checkpoint
from pyro_vae.errors import CheckpointError

root, kills = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(0)
weights = torch.randn(2 * 2**20, generator=torch.Generator().manual_seed(0))  # 8 MiB


def writer(run, atomic):
    ckpts = CheckpointDir(run)
    ckpts.clean_temp_files()
    n = 0
    while True:
        payload = {"w": weights, "progress": {"step": n}}
        ckpts.save(payload) if atomic else torch.save({"format_version": 2, **payload}, run / "last.pt")
        n += 1
        if n == 1:
            os.write(ready_w, b"x")


def kill_loop(run, atomic):
    global ready_w
    run.mkdir()
    stats = {"kills": 0, "mid_save": 0, "unreadable": 0, "resumable": 0}
    for _ in range(kills):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            try:
                writer(run, atomic)
            finally:
                os._exit(1)
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)
        time.sleep(rng.uniform(0.0, 0.05))
        if atomic:  # aim at a write: wait until the new checkpoint's temp file is being filled, then kill within 1 ms
            while not any(p.name.startswith(".tmp-last.pt.") and "sha256" not in p.name for p in run.iterdir()):
                pass
            time.sleep(rng.uniform(0.0, 0.001))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        stats["kills"] += 1
        names = {p.name for p in run.iterdir()}
        stats["mid_save"] += any(n.startswith(".tmp-") for n in names) or "last.pt.sha256" not in names
        for path in CheckpointDir(run).existing() if atomic else [run / "last.pt"]:
            try:
                load_checkpoint(path)
            except CheckpointError:
                stats["unreadable"] += 1
        latest = CheckpointDir(run).latest()
        try:
            load_checkpoint(latest)
            stats["resumable"] += 1
        except CheckpointError:
            pass
    return stats


print(json.dumps({"atomic": kill_loop(root / "atomic", True), "in_place": kill_loop(root / "in_place", False)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill loop forks its writers (POSIX)")
def test_25_kills_while_writing_leave_no_unreadable_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", KILL_LOOP_SCRIPT, str(tmp_path), "25"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    print(stats)
    atomic, in_place = stats["atomic"], stats["in_place"]
    assert atomic["kills"] == 25 and atomic["unreadable"] == 0 and atomic["resumable"] == 25
    # The kills did land inside saves (a temp file or a missing sidecar was left behind)...
    assert atomic["mid_save"] >= 20, atomic
    # ...and the same loop catches the torn files of an in-place torch.save.
    assert in_place["unreadable"] >= 1, in_place


# ------------------------------------------------------------------------------------------------ safe loading


def test_a_malicious_torch_checkpoint_with_a_valid_checksum_is_refused(tmp_path):
    """torch.save pickles the object; even with a matching sidecar (so the checksum passes), weights_only refuses
    to call ``open`` and the marker file never appears."""
    _Marker.path = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    torch.save({"format_version": 2, "x": _Marker()}, path)
    (tmp_path / "last.pt.sha256").write_text(f"{sha256_of(path)}  last.pt\n")
    with pytest.raises(CheckpointError, match=r"last\.pt \(\d+ bytes\) holds objects that are not plain data"):
        load_checkpoint(path)
    assert not _Marker.path.exists()


def _load_calls(tree):
    """Calls of torch.load (as torch.load, torch.serialization.load, or a name imported from either)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            aliases |= {a.asname or a.name for a in node.names if a.name == "load"}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in aliases:
            yield node
        elif isinstance(func, ast.Attribute) and func.attr == "load":
            owner = ast.unparse(func.value)
            if owner in ("torch", "torch.serialization", "serialization"):
                yield node


def test_every_torch_load_in_the_package_passes_weights_only_true():
    package = Path(__file__).resolve().parents[1] / "pyro_vae"
    found = 0
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in _load_calls(tree):
            found += 1
            kw = {k.arg: k.value for k in node.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            assert ok, f"{path.name}:{node.lineno} calls torch.load without weights_only=True"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pickle":
                assert node.attr not in ("load", "loads", "Unpickler"), f"{path.name}:{node.lineno} unpickles"
    assert found >= 1  # the check looks at real calls (load_checkpoint's)


def test_rotation_closes_gaps_and_never_renames_onto_a_newer_file(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep_last=4)
    for step in range(1, 4):
        ckpts.save(step_payload(step))  # last = 3, prev = 2, prev2 = 1
    (tmp_path / "last.pt").unlink()  # as after a resume from last.prev.pt moved it aside
    (tmp_path / "last.pt.sha256").unlink()
    ckpts.save(step_payload(4))
    assert [p.name for p in ckpts.existing()] == ["last.pt", "last.prev.pt", "last.prev2.pt"]
    assert [saved(p) for p in ckpts.existing()] == [4, 2, 1]


def test_newest_passes_over_a_damaged_file_to_the_newest_that_verifies(tmp_path, monkeypatch):
    import pyro_vae.checkpoint.chain as chain

    monkeypatch.setattr(chain, "READ_RETRY_SECONDS", 0.05)  # a damaged file stays damaged: do not wait long
    ckpts = CheckpointDir(tmp_path)
    assert ckpts.newest() is None
    ckpts.save(step_payload(1))
    ckpts.save(step_payload(2))
    (tmp_path / "last.pt").write_bytes(b"torn")
    found = ckpts.newest()
    assert found.path == tmp_path / "last.prev.pt" and found.payload["progress"]["step"] == 1
    (tmp_path / "last.prev.pt").write_bytes(b"torn too")
    with pytest.raises(CheckpointError, match=r"last\.pt \(4 bytes\) fails its checksum"):
        ckpts.newest()
