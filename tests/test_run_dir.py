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
