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
def test_defect_7_a_full_disk_at_the_first_checkpoint_leaves_a_directory_a_rerun_accepts(tmp_path, monkeypatch, existed):
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
    with pytest.raises(ConfigError, match="NUL byte"):
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
