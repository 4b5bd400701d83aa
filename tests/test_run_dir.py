"""RunDir, TrainingState and load_run: each test pins a run-directory defect of issue 11 (numbers in the names)."""

import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_vae.checkpoint.files as ckfiles
from pyro_vae.checkpoint import CheckpointDir, Progress, TrainingState, load_checkpoint, save_checkpoint
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import DataRecord, data_record, load_dataset
from pyro_vae.errors import CheckpointError, ConfigError, DataError
from pyro_vae.model import VAE
from pyro_vae.run_dir import RUN_FILES, RunDir, load_run, read_run_config
from pyro_vae.run_dir.files import lock_holder

ROOT = Path(__file__).resolve().parents[1]
CONFIG = RunConfig(model=ModelConfig(latent_dim=2, hidden_dims=(8,)), train=TrainConfig(epochs=1, batch_size=4))
DATA = DataRecord("tiny", 8, 4, "ab" * 32, None)


def make_state(step: int = 0, *, config: RunConfig = CONFIG, data: DataRecord = DATA, records=()) -> TrainingState:
    vae = VAE.from_config(config.model, 6)
    return TrainingState(
        run_id="",
        config=config.to_dict(),
        versions={"torch": str(torch.__version__)},
        input_dim=6,
        image_shape=[2, 3],
        data=data,
        world_size=1,
        global_batch=4,
        model=vae.state_dict(),
        optimizer={},
        schedules={},
        rng={"torch": torch.get_rng_state(), "cuda": []},
        progress=Progress(0, 0, step),
        losses=torch.arange(float(step), dtype=torch.float64),
        records=list(records),
        metrics_offset=0,
    )


def new_run(path: Path, *steps: int, keep_last: int = 2) -> str:
    """A run in ``path`` with one checkpoint per step; returns its run id."""
    with RunDir(path, keep_last=keep_last).open("new") as run:
        run.write_config({"config": CONFIG.to_dict()})
        for step in steps:
            run.save_checkpoint(make_state(step))
        return run.run_id


def step_of(path: Path) -> int:
    return load_checkpoint(path)["progress"]["step"]


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------- defect 1: the lock

CONTENDER = """
import json, os, sys, time
from pathlib import Path
from pyro_vae.errors import ConfigError
from pyro_vae.run_dir import RunDir

run, signals = Path(sys.argv[1]), Path(sys.argv[2])
for mode in ("new", "resume", "overwrite"):
    while not (signals / ("go-" + mode)).exists():
        time.sleep(0.001)
    try:
        held = RunDir(run).open(mode)
    except ConfigError as err:
        print(json.dumps({"mode": mode, "pid": os.getpid(), "error": str(err)}), flush=True)
        continue
    print(json.dumps({"mode": mode, "pid": os.getpid(), "won": True}), flush=True)
    while not (signals / ("release-" + mode)).exists():
        time.sleep(0.001)
    if mode != "overwrite":
        held.close()  # the last one exits holding the lock: the kernel must release it
"""


@pytest.mark.slow
def test_defect_1_two_writers_one_wins_the_other_names_its_pid(tmp_path):
    run, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", CONTENDER, str(run), str(signals)], stdout=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    try:
        for mode in ("new", "resume", "overwrite"):
            (signals / f"go-{mode}").touch()
            results = [json.loads(p.stdout.readline()) for p in procs]
            winners = [r for r in results if r.get("won")]
            losers = [r for r in results if "error" in r]
            assert len(winners) == 1 and len(losers) == 1, results
            assert losers[0]["error"].startswith(
                f"run directory {run} is in use by process {winners[0]['pid']} (started "
            ), losers[0]["error"]
            assert losers[0]["error"].endswith("; wait for it or choose another --out")
            (signals / f"release-{mode}").touch()
            deadline = time.monotonic() + 60
            while lock_holder(run) is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            if mode == "new":  # give the resume round a run to resume
                with RunDir(run).open("overwrite") as writer:
                    writer.write_config({"config": CONFIG.to_dict()})
                    writer.save_checkpoint(make_state(1))
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            p.kill()
            p.wait()
            p.stdout.close()
    # The overwrite winner exited while holding the lock: it is free again.
    with RunDir(run).open("overwrite"):
        pass


def test_defect_1_the_lock_is_checked_before_anything_is_created_and_again_under_it(tmp_path):
    run = tmp_path / "run"
    holder = RunDir(run).open("new")
    try:
        with pytest.raises(ConfigError) as err:
            RunDir(run).open("overwrite")
        assert f"is in use by process {os.getpid()} (started " in one_line(err)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.close()


# ------------------------------------------------------------------------- defect 5: resume from an old file twice


def test_defect_5_resuming_from_last_prev_twice_keeps_the_most_trained_checkpoint(tmp_path):
    run = tmp_path / "run"
    new_run(run, 1, 2, 3, keep_last=3)  # last = 3, prev = 2, prev2 = 1
    for again in (30, 31):  # each resume from step 2 trains to a new checkpoint, then is resumed from prev again
        with RunDir(run, keep_last=3).open("resume", resume_from=run / "last.prev.pt") as writer:
            assert writer.resume_state().progress.step == 2
            assert step_of(run / "last.pt") in (3, 30)  # nothing moves before the first save
            writer.save_checkpoint(make_state(again))
    names = sorted(p.name for p in run.glob("last*.pt"))
    assert names == ["last.prev.pt", "last.prev2.pt", "last.pt", "last.superseded-3.pt", "last.superseded-30.pt"]
    assert [step_of(run / n) for n in ("last.pt", "last.prev.pt", "last.superseded-3.pt")] == [31, 2, 3]
    assert step_of(run / "last.superseded-30.pt") == 30
    # A third resume from the same step-2 file with the same newer step never overwrites: -2.
    with RunDir(run, keep_last=3).open("resume", resume_from=run / "last.prev.pt") as writer:
        writer.save_checkpoint(make_state(31))
    with RunDir(run, keep_last=3).open("resume", resume_from=run / "last.prev.pt") as writer:
        writer.save_checkpoint(make_state(32))
    assert step_of(run / "last.superseded-31.pt") == 31 and step_of(run / "last.superseded-31-2.pt") == 31
    for name in ("last.superseded-3.pt", "last.superseded-31-2.pt"):
        assert (run / (name + ".sha256")).read_text().split() == [ckfiles.sha256_of(run / name), name]
    assert {"last.superseded-3.pt"} <= {p.name for p in run.glob(RUN_FILES[3])}  # overwrite knows them


# --------------------------------------------------------------------------- defect 6: a checkpoint from elsewhere


def test_defect_6_a_checkpoint_copied_from_another_run_is_refused_and_force_adopts_it(tmp_path):
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine_id = new_run(mine, 1)
    other_id = new_run(other, 5)
    with RunDir(mine).open("resume") as writer:
        writer.metrics().append({"epoch": 0})
        writer.save_checkpoint(dataclasses.replace(make_state(2, records=[{"epoch": 0}]), metrics_offset=13))
    for name in ("last.pt", "last.pt.sha256"):
        (mine / name).write_bytes((other / name).read_bytes())
    metrics_before = (mine / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError) as err:
        with RunDir(mine).open("resume") as writer:
            writer.resume_state()
    message = one_line(err)
    assert f"checkpoint {mine / 'last.pt'} belongs to run {other_id}" in message
    assert f"but {mine / 'config.json'} is run {mine_id}" in message and "--force-resume" in message
    assert (mine / "metrics.jsonl").read_bytes() == metrics_before  # refused: nothing changed
    assert step_of(mine / "last.pt") == 5
    # force adopts it: the run keeps the directory's id, and the log is rebuilt from the adopted records.
    with RunDir(mine).open("resume", force=True) as writer:
        state = writer.resume_state()
        assert state.progress.step == 5 and writer.run_id == mine_id
        log = writer.metrics(state.metrics_offset, rebuild=[{"epoch": "adopted"}])
        log.close()
        writer.save_checkpoint(state)
    assert load_checkpoint(mine / "last.pt")["run_id"] == mine_id
    assert (mine / "metrics.jsonl").read_text() == '{"epoch": "adopted"}\n'


# -------------------------------------------------------------------------------------------- defect 7: full disk


def no_space_after(monkeypatch, n_bytes: int):
    """Make ``os.write`` write at most ``n_bytes`` more bytes in total, then fail as a full device does."""
    real_write, left = os.write, [n_bytes]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = real_write(fd, bytes(data[: left[0]]))
        left[0] -= written
        return written

    monkeypatch.setattr(os, "write", write)


def test_defect_7_a_full_disk_while_appending_metrics_keeps_the_previous_lines(tmp_path, monkeypatch):
    with RunDir(tmp_path / "run").open("new") as writer:
        log = writer.metrics()
        log.append({"epoch": 0, "test_elbo": -100.5})
        before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
        with monkeypatch.context() as patch:
            no_space_after(patch, 5)  # a torn half line reaches the disk before the device is full
            with pytest.raises(CheckpointError) as err:
                log.append({"epoch": 1, "test_elbo": -99.0})
        message = one_line(err)
        assert message.startswith(f"no space left while writing {tmp_path / 'run' / 'metrics.jsonl'} (")
        assert "bytes free" in message and "its previous lines are kept" in message
        assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
        log.append({"epoch": 1})  # the log goes on from its last whole line
        assert log.offset == len(before) + len(b'{"epoch": 1}\n')
        log.close()


def test_defect_7_a_full_disk_while_writing_a_figure_leaves_no_empty_png(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = RunDir(tmp_path)
    fig = plt.figure(figsize=(1, 1))
    try:
        good = run.write_figure("loss.png", fig).read_bytes()
        assert good.startswith(b"\x89PNG")
        no_space_after(monkeypatch, 0)
        for name in ("loss.png", "fresh.png"):
            with pytest.raises(CheckpointError) as err:
                run.write_figure(name, fig)
            assert one_line(err).startswith(f"no space left while writing {tmp_path / name} (")
    finally:
        plt.close(fig)
    monkeypatch.undo()
    assert (tmp_path / "loss.png").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]  # no fresh.png, no temp files


@pytest.mark.parametrize("existed", [False, True], ids=["made-by-open", "empty-before"])
def test_defect_7_a_full_disk_at_the_first_checkpoint_leaves_a_state_a_rerun_accepts(tmp_path, monkeypatch, existed):
    run = tmp_path / "runs" / "a"
    if existed:
        run.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no space left while writing .*last.pt"):
        with RunDir(run).open("new") as writer:
            writer.write_config({"config": CONFIG.to_dict()})
            writer.metrics().append({"epoch": 0})
            writer.write_json("eval.json", {"k": 1})
            no_space_after(monkeypatch, 100)
            writer.save_checkpoint(make_state(0))
    monkeypatch.undo()
    if existed:
        assert list(run.iterdir()) == []
    else:
        assert not (tmp_path / "runs").exists()
    assert new_run(run, 1)  # a plain re-run is accepted


# ------------------------------------------------------------------------------ defect 9: refused runs leave nothing


def test_defect_9_a_refused_open_creates_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [
        ("resume", tmp_path / "a" / "b", "holds no run to resume"),
        ("new", tmp_path / "file", "exists and is not a directory"),
        ("new", tmp_path / "file" / "sub", "is not writable|not a directory"),
    ]
    for mode, path, message in cases:
        with pytest.raises(ConfigError, match=message):
            RunDir(path).open(mode)
    with pytest.raises(ConfigError, match="must not contain '..' or NUL"):
        RunDir(str(tmp_path / "x\0y"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no checkpoint .* --overwrite"):
        RunDir(empty).open("resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"] and not list(empty.iterdir())


def test_defect_9_a_run_refused_in_its_body_before_a_checkpoint_removes_what_it_wrote(tmp_path):
    run = tmp_path / "out"
    with pytest.raises(ConfigError, match="kl schedule"):
        with RunDir(run).open("new") as writer:
            writer.write_config({"config": CONFIG.to_dict()})
            writer.metrics()
            raise ConfigError("bad kl schedule")  # what fit's own checks raise after open
    assert not run.exists()
    # In a directory of the user's, only what the run wrote goes.
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        with RunDir(run).open("new") as writer:
            writer.write_json("eval.json", {"a": 1})
            raise KeyboardInterrupt
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    # After the first checkpoint, a failure leaves the run resumable.
    with pytest.raises(RuntimeError):
        with RunDir(run).open("new") as writer:
            writer.write_config({"config": CONFIG.to_dict()})
            writer.save_checkpoint(make_state(1))
            raise RuntimeError("killed later")
    with RunDir(run).open("resume") as writer:
        assert writer.resume_state().progress.step == 1


# ------------------------------------------------------------------------------------ defect 11: planted symlinks


def test_defect_11_planted_symlinks_are_never_written_through(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    run_id = new_run(run, 1)
    targets = {name: outside / name for name in ("metrics.jsonl", "eval.json", "config.json")}
    for name, target in targets.items():
        target.write_text(json.dumps({"config": CONFIG.to_dict(), "environment": {}}))  # looks like a run config
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(target)
    before = {name: target.read_bytes() for name, target in targets.items()}
    with RunDir(run).open("resume") as writer:
        with pytest.raises(ConfigError) as err:
            writer.metrics()
        assert one_line(err) == (
            f"{run / 'metrics.jsonl'} is a symbolic link or a special file; pyro_vae never writes through one: "
            "remove it"
        )
        writer.write_json("eval.json", {"elbo": -90.0})
        writer.write_config({"config": CONFIG.to_dict()})
        assert writer.run_id is not None
    assert {name: target.read_bytes() for name, target in targets.items()} == before
    assert not (run / "eval.json").is_symlink() and json.loads((run / "eval.json").read_text()) == {"elbo": -90.0}
    assert not (run / "config.json").is_symlink()
    del run_id
    # A FIFO planted as the log cannot hang the run either.
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    with RunDir(run).open("resume") as writer:
        for offset in (None, 0):
            with pytest.raises(ConfigError, match="special file|not a regular"):
                writer.metrics(offset)


# ---------------------------------------------------------------------------- defect 12: readers race the rotation

ROTATING_WRITER = """
import sys, time
from pathlib import Path
from pyro_vae.checkpoint import TrainingState, load_checkpoint
from pyro_vae.run_dir import RunDir

run, template, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
state = TrainingState.from_payload(load_checkpoint(template), source=str(template))
with RunDir(run, keep_last=2).open("resume") as writer:
    print("writing", flush=True)
    step, end = state.progress.step, time.monotonic() + seconds
    while time.monotonic() < end:
        step += 1
        writer.save_checkpoint(state.__class__(**{**state.__dict__, "progress": state.progress._replace(step=step)}))
print(step, flush=True)
"""


@pytest.mark.slow
def test_defect_12_readers_survive_a_writer_rotating_the_chain(tmp_path):
    run = tmp_path / "run"
    new_run(run, 1)
    save_checkpoint(tmp_path / "template.pt", make_state(1).to_payload())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen(
        [sys.executable, "-c", ROTATING_WRITER, str(run), str(tmp_path / "template.pt"), "2.0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    failures, steps = [], []
    try:
        assert writer.stdout.readline().strip() == "writing"
        while writer.poll() is None:
            try:
                steps.append(load_run(run).state.progress.step)
                assert RunDir(run).latest() is not None
            except Exception as err:  # noqa: BLE001 - any failure of a reader is what this test counts
                failures.append(f"{type(err).__name__}: {err}")
        last_step = int(writer.stdout.read().split()[-1])
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    assert writer.returncode == 0
    assert failures == []
    assert last_step > 10 and len(steps) >= 5, (last_step, len(steps))  # the race was exercised
    assert steps == sorted(steps)  # a reader never goes back to an older checkpoint than one it already saw


# ----------------------------------------------------------------------------------------- defect 13: smaller ones


def test_defect_13_non_finite_numbers_are_written_as_null(tmp_path):
    record = {"elbo": float("nan"), "kl": [float("inf"), 1.5, -float("inf")], "nested": {"x": float("nan")}}
    path = RunDir(tmp_path).write_json("eval.json", record)
    assert json.loads(path.read_text()) == {"elbo": None, "kl": [None, 1.5, None], "nested": {"x": None}}
    with RunDir(tmp_path / "run").open("new") as writer:
        log = writer.metrics()
        log.append(record)
        log.close()
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"elbo": None, "kl": [None, 1.5, None], "nested": {"x": None}}


def count_file_operations(monkeypatch, run: Path, keep_last: int, saves: int) -> int:
    """File-system calls (stat, rename, unlink, open) made by ``saves`` saves into a run with ``keep_last``."""
    calls = [0]
    for name in ("stat", "lstat", "replace", "rename", "unlink", "open", "scandir", "listdir"):
        real = getattr(os, name)

        def counted(*args, _real=real, **kw):
            calls[0] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(os, name, counted)
    state = make_state(1)
    with RunDir(run, keep_last=keep_last).open("new") as writer:
        for _ in range(saves):
            writer.save_checkpoint(state)
    monkeypatch.undo()
    return calls[0]


def test_defect_13_a_huge_keep_last_costs_no_more_file_operations_than_two(tmp_path, monkeypatch):
    small = count_file_operations(monkeypatch, tmp_path / "small", 2, saves=4)
    huge = count_file_operations(monkeypatch, tmp_path / "huge", 1_000_000, saves=4)
    # The huge chain keeps 4 files instead of 2, so its shifts rename a few more: a handful of calls per save more,
    # not a million (today's rotation stats every possible name).
    assert small < huge < small + 4 * 25, (small, huge)
    assert len(CheckpointDir(tmp_path / "huge").existing()) == 4


def test_defect_13_overwrite_refuses_a_config_json_that_is_not_a_runs_and_keeps_other_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"my": "settings"}')
    for mode in ("new", "overwrite"):
        with pytest.raises(ConfigError) as err:
            RunDir(run).open(mode)
        assert one_line(err) == (
            f"{run / 'config.json'} is not a pyro_vae run config; pyro_vae will not replace it: move it away or "
            "choose another --out"
        )
    assert (run / "config.json").read_text() == '{"my": "settings"}' and sorted(os.listdir(run)) == ["config.json"]
    (run / "config.json").unlink()
    # overwrite removes exactly the run's files: its chain, superseded files, sidecars, log and listed extras.
    new_run(run, 1, 2)
    with RunDir(run).open("resume", resume_from=run / "last.prev.pt") as writer:
        writer.save_checkpoint(make_state(3))
        writer.write_json("gaps.json", {})
        writer.metrics().close()
    (run / "notes.txt").write_text("mine")
    (run / "figure.png").write_text("the user's own")
    assert "last.superseded-2.pt" in os.listdir(run)
    with RunDir(run).open("overwrite"):
        assert sorted(os.listdir(run)) == [".lock", "figure.png", "notes.txt"]


# ---------------------------------------------------------------------------------------- crafted checkpoints


def crafted(field: str, value):
    payload = {"format_version": 3, **make_state(1).to_payload()}
    if value is KeyError:
        del payload[field]
    else:
        payload[field] = value
    return payload


CRAFTED = {
    "missing config": (crafted("config", KeyError), r"lacks the field\(s\) config"),
    "config of wrong types": (crafted("config", {"model": {"hidden_dims": None}}), "field 'config' is not a valid"),
    "image shape": (crafted("image_shape", [4, 4]), r"field 'image_shape' is \[4, 4\] \(16 values\) but input_dim"),
    "image shape type": (crafted("image_shape", "28x28"), "field 'image_shape' is '28x28', not None or a list"),
    "rng bytes": (crafted("rng", {"torch": torch.zeros(7, dtype=torch.uint8), "cuda": []}), "field 'rng' 'torch'"),
    "rng type": (crafted("rng", {"torch": [1, 2], "cuda": []}), "must be a uint8 tensor of 5056 bytes"),
    "progress": (crafted("progress", {"epoch": "0"}), "field 'progress' must be a dict with the keys"),
    "losses": (crafted("losses", [1.0]), "field 'losses' must be a 1-d float64 tensor"),
    "data": (crafted("data", {"name": "x"}), "field 'data' needs a str 'name'"),
    "world size": (crafted("world_size", 0), "field 'world_size' is 0, not an int >= 1"),
}


@pytest.mark.parametrize("case", list(CRAFTED), ids=list(CRAFTED))
def test_crafted_payloads_are_one_line_errors_naming_the_file_and_field(tmp_path, case):
    payload, message = CRAFTED[case]
    with pytest.raises(CheckpointError, match=message) as err:
        TrainingState.from_payload(payload, source="RUN/last.pt")
    assert one_line(err).startswith("checkpoint RUN/last.pt")
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "last.pt", payload)
    with pytest.raises(CheckpointError, match=message) as err:
        load_run(run)
    assert one_line(err).startswith(f"checkpoint {run / 'last.pt'}")


def test_weights_of_another_architecture_are_one_line_errors(tmp_path):
    wide = RunConfig(model=ModelConfig(latent_dim=3, hidden_dims=(8,)))
    payload = make_state(1).to_payload()
    payload["config"] = wide.to_dict()  # the config says L=3, the weights are for L=2
    save_checkpoint(tmp_path / "last.pt", payload)
    with pytest.raises(CheckpointError, match=r"weight '.*' has shape \(\d+, \d+\) but this model needs") as err:
        load_run(tmp_path)
    one_line(err)
    payload = make_state(1).to_payload()
    payload["model"] = {"encoder.weight": torch.zeros(2)}
    save_checkpoint(tmp_path / "last.pt", payload)
    with pytest.raises(CheckpointError, match=r"weights do not fit .*missing \[.*unexpected \['encoder.weight'\]"):
        load_run(tmp_path)


def test_a_version_2_checkpoint_is_read_with_its_run_id_unrecorded(tmp_path):
    payload = make_state(3).to_payload()
    for key in ("run_id", "world_size", "global_batch", "callbacks"):
        del payload[key]
    del payload["data"]["path"]
    path = tmp_path / "last.pt"
    torch.save({"format_version": 2, **payload}, path)
    state = TrainingState.from_payload(load_checkpoint(path), source=str(path))
    assert (state.run_id, state.world_size, state.global_batch, state.data.path) == ("", 1, 4, None)
    assert state.progress == Progress(0, 0, 3) and state.callbacks == {}
    with pytest.raises(CheckpointError, match="has format 1, which this pyro_vae cannot resume or load"):
        TrainingState.from_payload({**payload, "format_version": 1}, source="old.pt")


# ------------------------------------------------------------------------------------------------------- load_run


def npz_run(tmp_path: Path, seed: int = 0) -> tuple[Path, DataConfig]:
    """A run trained (nominally) on a small npz of 2x3 images; returns the run directory and its data config."""
    images = np.random.default_rng(seed).random((20, 2, 3), dtype=np.float32)
    np.savez(tmp_path / "images.npz", x=images)
    data_config = DataConfig(dataset="npz", path=str(tmp_path / "images.npz"), binarize="dynamic")
    config = CONFIG.replace(data={"dataset": "npz", "path": str(tmp_path / "images.npz")})
    record = data_record(load_dataset(data_config), data_config)
    run = tmp_path / "run"
    with RunDir(run).open("new") as writer:
        writer.write_config({"config": config.to_dict()})
        writer.metrics().append({"epoch": 0, "test_elbo": -4.0})
        writer.save_checkpoint(make_state(5, config=config, data=record))
    return run, data_config


def test_load_run_round_trip(tmp_path):
    run, _ = npz_run(tmp_path)
    saved = load_checkpoint(run / "last.pt")
    loaded = load_run(run)
    assert not loaded.vae.training and loaded.path == run and loaded.checkpoint == run / "last.pt"
    for key, value in loaded.vae.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key
    assert loaded.config == RunConfig.from_dict(saved["config"]) == read_run_config(run)
    assert loaded.state.run_id == saved["run_id"] == json.loads((run / "config.json").read_text())["run_id"]
    assert loaded.metrics == [{"epoch": 0, "test_elbo": -4.0}]
    # A torn last line (a kill mid-append) is ignored; a damaged middle line is not.
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"epoch": 1, "te')
    assert load_run(run).metrics == [{"epoch": 0, "test_elbo": -4.0}]
    (run / "metrics.jsonl").write_bytes(b'{"epoch": 0, "te\n{"epoch": 1}\n')
    with pytest.raises(CheckpointError, match="line 1 is not JSON"):
        _ = load_run(run).metrics


def test_run_data_is_found_from_anywhere_and_other_data_are_refused(tmp_path, monkeypatch):
    run, data_config = npz_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recorded path is absolute: found from another directory
    loaded = load_run(run)
    assert loaded.data().x_train.shape == (18, 6)
    result = loaded.evaluate(ks=(1, 2), n=2, seed=0)
    assert result.protocol[:4] == ("npz:images.npz", "test", "dynamic", 0) and result.protocol.num_images == 2
    with pytest.raises(ConfigError, match=r"n=3 exceeds the run's 2 test images"):
        loaded.evaluate(ks=(1,), n=3)
    recorded = loaded.state.data.sha256
    np.savez(tmp_path / "images.npz", x=np.random.default_rng(1).random((20, 2, 3), dtype=np.float32))
    with pytest.raises(DataError) as err:
        loaded.data()
    message = one_line(err)
    fresh = data_record(load_dataset(data_config), data_config).sha256
    assert f"the data read from {tmp_path / 'images.npz'} (fingerprint {fresh[:16]})" in message
    assert f"({tmp_path / 'images.npz'}, fingerprint {recorded[:16]})" in message


def test_read_run_config_and_load_run_say_plainly_when_there_is_no_run(tmp_path):
    for call in (load_run, read_run_config):
        with pytest.raises(ConfigError, match="is no run directory or checkpoint file"):
            call(tmp_path / "nothing")
        with pytest.raises(ConfigError, match="holds no checkpoint"):
            call(tmp_path)
