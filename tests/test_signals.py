"""SIGINT and SIGTERM: finish the step, write a checkpoint, say how to resume, exit 130 or 143; a second signal stops
at once. The resumed run equals an uninterrupted one bit for bit.

The fit-level tests send the signal from a callback to the test process itself (a real signal, delivered to fit's
handler between two steps); the command-line tests send it from outside to a running ``pyro-vae train``.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pyro
import pytest
import torch

from pyro_vae import cli
from pyro_vae.checkpoint import CheckpointDir, load_checkpoint
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.model import VAE
from pyro_vae.train import Callback, TrainingInterrupted, fit

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")


@pytest.fixture(autouse=True)
def default_sigint():
    """Python's own SIGINT handler for each test, whatever the suite inherited: a shell without job control starts
    background commands with SIGINT ignored, and Python then leaves it ignored (a suite run as ``cmd &`` saw no
    KeyboardInterrupt where these tests expect the usual one)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig(n_train=256, n_test=64))


def config(**train):
    defaults = {"epochs": 3, "batch_size": 64, "progress": False, "threads": 1}
    return RunConfig(model=ModelConfig(latent_dim=2, hidden_dims=(32, 16)), train=TrainConfig(**{**defaults, **train}))


def new_vae(data):
    pyro.set_rng_seed(0)
    return VAE.from_config(config().model, data.input_dim)


@pytest.fixture(scope="module")
def reference(data):
    vae = new_vae(data)
    return vae, fit(vae, data, config())


class SignalAt(Callback):
    """Sends ``signals`` to this very process right after step ``step``."""

    def __init__(self, step, *signals):
        self.step, self.signals = step, signals

    def on_step_end(self, state):
        if state.step == self.step:
            for signum in self.signals:
                os.kill(os.getpid(), signum)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_checkpoints_and_resumes_bit_exactly(data, reference, tmp_path, signum, code):
    out = tmp_path / "run"
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as info:
        fit(new_vae(data), data, config(), out_dir=out, callbacks=[SignalAt(6, signum)])
    err = info.value
    assert (err.exit_code, err.step, err.checkpoint) == (code, 6, out / "last.pt")
    name = signal.Signals(signum).name
    assert str(err) == (
        f"interrupted at step 6 by {name} (epoch 1, batch 2 of 4); checkpoint written to {out / 'last.pt'}; "
        f"resume with: pyro-vae train --resume {out}"
    )
    assert signal.getsignal(signum) is before  # the handlers are fit's only while it runs
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 6
    vae = new_vae(data)
    result = fit(vae, data, config(), out_dir=out, resume=True)
    ref_vae, ref = reference
    assert result.losses == ref.losses
    for name, value in vae.state_dict().items():
        assert torch.equal(value, ref_vae.state_dict()[name]), name
    for key, state in result.optimizer.state_dict()["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, ref.optimizer.state_dict()["optimizer"]["state"][key][field])


def test_a_second_signal_stops_at_once(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(new_vae(data), data, config(), out_dir=out, callbacks=[SignalAt(6, signal.SIGINT, signal.SIGINT)])
    # No checkpoint for step 6 was written, and the files there are whole: the one from the end of epoch 0 loads.
    assert load_checkpoint(CheckpointDir(out).latest())["progress"]["step"] == 4
    assert not list(out.glob(".tmp-*"))


def test_without_a_run_directory_signals_keep_their_usual_effect(data):
    with pytest.raises(KeyboardInterrupt):
        fit(new_vae(data), data, config(), callbacks=[SignalAt(2, signal.SIGINT)])


TINY = ["--n-train", "256", "--n-test", "64", "--hidden-dims", "32,16", "--latent-dim", "2", "--batch-size", "32"]
LONG = [*TINY, "--epochs", "500", "--threads", "1", "--no-figures"]


def wait_for_first_epoch(out, alive=lambda: True, timeout=120):
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert alive() and time.monotonic() < deadline, "the run ended or stalled before its first epoch"
        time.sleep(0.01)


def interrupted_line(stderr, out, signum):
    """The one line that says where the run stopped; returns (step, epoch)."""
    (line,) = [line for line in stderr.splitlines() if line.startswith("pyro-vae:")]
    checkpoint, run = re.escape(str(out / "last.pt")), re.escape(str(out))
    match = re.fullmatch(
        rf"pyro-vae: interrupted at step (\d+) by {signal.Signals(signum).name} \(epoch (\d+), batch \d+ of \d+\); "
        rf"checkpoint written to {checkpoint}; resume with: pyro-vae train --resume {run}",
        line,
    )
    assert match, line
    return int(match.group(1)), int(match.group(2))


@pytest.mark.parametrize(
    ("signum", "code", "model"),
    [
        (signal.SIGINT, 130, []),
        (signal.SIGTERM, 143, []),
        (signal.SIGTERM, 143, ["--model", "m2", "--labelled", "40"]),  # two batch streams, both resumed in place
    ],
)
def test_the_command_line_returns_128_plus_the_signal_and_resumes_bit_exactly(tmp_path, capsys, signum, code, model):
    """``pyro-vae train`` runs here, in the main thread; a watcher thread sends the signal after the first epoch."""
    out = tmp_path / "run"
    watcher = threading.Thread(target=lambda: (wait_for_first_epoch(out), os.kill(os.getpid(), signum)))
    watcher.start()
    try:
        assert cli.main(["train", *LONG, *model, "--out", str(out)]) == code
    finally:
        watcher.join()
    step, epoch = interrupted_line(capsys.readouterr().err, out, signum)
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == step
    # Resume to the end of the interrupted epoch, and compare with a run that went there directly.
    epochs = str(epoch + 1)
    assert cli.main(["train", "--resume", str(out), "--epochs", epochs]) == 0
    ref_out = tmp_path / "ref"
    reference = ["train", *TINY, *model, "--epochs", epochs, "--threads", "1", "--no-figures", "--out", str(ref_out)]
    assert cli.main(reference) == 0
    capsys.readouterr()
    resumed, ref = load_checkpoint(out / "last.pt"), load_checkpoint(ref_out / "last.pt")
    assert resumed["progress"] == ref["progress"] and resumed["progress"]["epoch"] == epoch + 1
    assert torch.equal(resumed["losses"], ref["losses"])
    for name, value in resumed["model"].items():
        assert torch.equal(value, ref["model"][name]), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == list(range(epoch + 1))


def test_a_terminated_pyro_vae_process_exits_143_with_the_resume_command(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "pyro_vae", "train", *LONG, "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_epoch(out, alive=lambda: proc.poll() is None)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    step, _ = interrupted_line(stderr, out, signal.SIGTERM)
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == step
