"""The training callbacks: early stopping, TensorBoard, the callback list, user callbacks, the metrics log on resume.

The runs are tiny (256 training images in 4 batches of 64 per epoch, 64 test images, a 2-d latent). Early stopping is
forced deterministically: a learning rate of 1e-9 moves the test ELBO by far less than ``min_delta = 1`` nat, so the
first epoch is the best and the run stops after ``1 + patience`` epochs.
"""

import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pyro
import pytest
import torch

from pyro_vae.callbacks import CallbackList, EarlyStopping, EpochRecord, StepState
from pyro_vae.checkpoint import Progress, load_checkpoint
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.errors import ConfigError
from pyro_vae.model import VAE
from pyro_vae.stats import MeanSE
from pyro_vae.train import fit

SMALL = ModelConfig(latent_dim=2, hidden_dims=(32, 16))
N_TRAIN, N_TEST, BATCH = 256, 64, 64
N_BATCHES = N_TRAIN // BATCH
PATIENCE = 2
STILL = {"lr": 1e-9, "early_stop": PATIENCE, "early_stop_min_delta": 1.0, "epochs": 6}  # stops after epoch 2


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig(n_train=N_TRAIN, n_test=N_TEST))


def config(**train):
    defaults = {"epochs": 3, "batch_size": BATCH, "progress": False, "threads": 1}
    return RunConfig(model=SMALL, train=TrainConfig(**{**defaults, **train}))


def new_vae(cfg, data):
    pyro.set_rng_seed(0)
    return VAE.from_config(cfg.model, data.input_dim)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def timeless(records):
    """Records without their wall-clock ``seconds``, the one field that differs between identical runs."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


class Crash(Exception):
    pass


class CrashAt:
    """A plain object (no base class) that crashes training after step ``step`` or after the record of ``epoch``:
    after MetricsLog has written the epoch's line and before the Checkpointer saves it."""

    def __init__(self, step=None, epoch=None):
        self.step, self.epoch = step, epoch

    def on_step_end(self, state):
        if state.step == self.step:
            raise Crash(f"simulated crash after step {state.step}")

    def on_epoch_end(self, record):
        if record.epoch == self.epoch:
            raise Crash(f"simulated crash after epoch {record.epoch}")


# -- EarlyStopping, bound to a stand-in loop -----------------------------------------------------------------------


def fake_loop(resumed=None):
    loop = SimpleNamespace(resumed=resumed, callback_states={}, position=Progress(), reasons=[])
    loop.request_stop = loop.reasons.append
    return loop


def record(epoch, test_elbo):
    se = MeanSE(test_elbo, 0.1)
    return EpochRecord(epoch, (epoch + 1) * N_BATCHES, test_elbo, se, se, se, 0.0, 1.0)


def feed(stopper, loop, elbos):
    """Feed whole-epoch records; returns the improved flags and the epochs after which a stop was requested."""
    improved, stops = [], []
    for epoch, value in enumerate(elbos):
        loop.position = Progress(epoch + 1, 0, (epoch + 1) * N_BATCHES)  # as after a complete epoch
        before = len(loop.reasons)
        stopper.on_epoch_end(record(epoch, value))
        improved.append(stopper.improved)
        stops += [epoch] * (len(loop.reasons) - before)
    return improved, stops


def test_early_stopping_needs_a_gain_above_min_delta_for_patience_epochs():
    # Quarter-nat steps are exact in binary, so "equal to best + min_delta" really is equal (and is no improvement).
    elbos = [-100.0, -99.0, -98.75, -98.5, -98.25, -98.375]
    stopper, loop = EarlyStopping(patience=2, min_delta=0.25), fake_loop()
    stopper.on_fit_start(loop)
    improved, stops = feed(stopper, loop, elbos)
    assert improved == [True, True, False, True, False, False]
    assert stops == [5]
    assert (stopper.best, stopper.best_epoch, stopper.waited) == (-98.5, 3, 2)
    assert loop.reasons[0].startswith("early stopping: the test ELBO did not improve by more than 0.25 nats for 2")
    assert "after epoch 3" in loop.reasons[0]
    assert loop.callback_states["early_stopping"]() == {"best": -98.5, "best_epoch": 3, "waited": 2}


def test_early_stopping_counts_a_nan_test_elbo_as_no_improvement():
    stopper, loop = EarlyStopping(patience=1), fake_loop()
    stopper.on_fit_start(loop)
    assert feed(stopper, loop, [-100.0, float("nan")]) == ([True, False], [1])


def test_early_stopping_ignores_a_partial_epoch_record():
    """A max_steps stop records its epoch half-way; that record is no epoch of patience."""
    stopper, loop = EarlyStopping(patience=1), fake_loop()
    stopper.on_fit_start(loop)
    feed(stopper, loop, [-100.0])
    loop.position = Progress(1, 2, N_BATCHES + 2, recorded=True)  # after the record of a half-done epoch 1
    stopper.on_epoch_end(record(1, -200.0))
    assert (stopper.improved, stopper.waited, loop.reasons) == (False, 0, [])


def test_early_stopping_restores_its_count_and_a_stopped_run_stays_stopped():
    saved = SimpleNamespace(callbacks={"early_stopping": {"best": -98.5, "best_epoch": 3, "waited": 1}})
    stopper, loop = EarlyStopping(patience=2, min_delta=0.25), fake_loop(resumed=saved)
    stopper.on_fit_start(loop)
    assert (stopper.best, stopper.best_epoch, stopper.waited, loop.reasons) == (-98.5, 3, 1, [])
    assert feed(stopper, loop, [-98.4])[1] == [0]  # the second epoch without a gain: stop
    # A resume of that stopped run (its checkpoint holds waited == patience) stops before training anything.
    saved.callbacks["early_stopping"] = stopper.state_dict()
    again = fake_loop(resumed=saved)
    EarlyStopping(patience=2, min_delta=0.25).on_fit_start(again)
    assert len(again.reasons) == 1 and again.reasons[0].startswith("early stopping")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"patience": 0}, "early-stopping patience must be a positive integer, got 0"),
        ({"patience": True}, "early-stopping patience must be a positive integer, got True"),
        ({"patience": 2, "min_delta": -1.0}, "early-stopping min_delta must be a finite number >= 0, got -1.0"),
        ({"patience": 2, "min_delta": float("nan")}, "early-stopping min_delta must be a finite number >= 0"),
    ],
)
def test_early_stopping_refuses_bad_settings(kwargs, words):
    with pytest.raises(ConfigError, match=r"^" + words.replace("(", r"\(").replace(")", r"\)")):
        EarlyStopping(**kwargs)


# -- early stopping in fit -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    """The uninterrupted early-stopped run."""
    cfg = config(**STILL)
    vae = new_vae(cfg, data)
    out = tmp_path_factory.mktemp("stopped") / "run"
    return vae, fit(vae, data, cfg, out_dir=out), out


def test_fit_stops_early_and_keeps_the_best_checkpoint(data, stopped, tmp_path):
    vae, result, out = stopped
    assert [r.epoch for r in result.epochs] == list(range(PATIENCE + 1))
    assert result.steps == (PATIENCE + 1) * N_BATCHES
    assert result.stop_reason.startswith(
        f"early stopping: the test ELBO did not improve by more than 1 nats for {PATIENCE}"
    )
    lines = metrics(out)
    assert len(lines) == PATIENCE + 1
    assert lines[-1]["stop_reason"] == result.stop_reason
    assert all("stop_reason" not in line for line in lines[:-1])
    # best.pt holds epoch 0 (the only improvement), with a sidecar that verifies, and equals a one-epoch run.
    assert (out / "best.pt.sha256").is_file()
    best = load_checkpoint(out / "best.pt")
    assert [r["epoch"] for r in best["records"]] == [0]
    assert best["records"][-1]["test_elbo"]["mean"] == result.epochs[0].test_elbo.mean
    assert best["callbacks"]["early_stopping"] == {
        "best": result.epochs[0].test_elbo.mean,
        "best_epoch": 0,
        "waited": 0,
    }
    one = config(**{**STILL, "epochs": 1})
    one_vae = new_vae(one, data)
    fit(one_vae, data, one)
    for name, tensor in one_vae.state_dict().items():
        assert torch.equal(best["model"][name], tensor), name
    assert any(not torch.equal(best["model"][name], t) for name, t in vae.state_dict().items())  # not the last state


@pytest.mark.parametrize("crash", [{"step": 2 * N_BATCHES + 1}, {"epoch": 1}])
def test_a_resume_continues_the_patience_count(data, stopped, tmp_path, crash):
    """Crash after the first epoch without a gain (epoch 1): in the first step of epoch 2 (the checkpoint of epoch 1,
    with one epoch of patience used, is resumed), or in epoch 1's own hooks after its metrics line was written (the
    checkpoint of epoch 0 is resumed and the line is cut away). Either way the resumed run stops where the
    uninterrupted one did, with the same losses, metrics and best checkpoint."""
    _, reference, ref_out = stopped
    cfg, out = config(**STILL), tmp_path / "run"
    with pytest.raises(Crash):
        fit(new_vae(cfg, data), data, cfg, out_dir=out, callbacks=[CrashAt(**crash)])
    saved = load_checkpoint(out / "last.pt")["callbacks"]["early_stopping"]
    assert saved["waited"] == (1 if "step" in crash else 0)
    result = fit(new_vae(cfg, data), data, cfg, out_dir=out, resume=True)
    assert result.losses == reference.losses  # Python floats, compared exactly
    assert result.stop_reason == reference.stop_reason
    assert timeless(metrics(out)) == timeless(metrics(ref_out))
    best, ref_best = load_checkpoint(out / "best.pt"), load_checkpoint(ref_out / "best.pt")
    assert timeless(best["records"]) == timeless(ref_best["records"])
    assert all(torch.equal(best["model"][name], t) for name, t in ref_best["model"].items())


def test_a_partial_epoch_does_not_use_up_patience(data, stopped, tmp_path):
    """A max_steps stop in the middle of epoch 1 records it half-done; resumed, the run still stops after epoch 2."""
    _, reference, _ = stopped
    out = tmp_path / "run"
    first = fit(new_vae(config(**STILL), data), data, config(**STILL, max_steps=6), out_dir=out)
    assert [r.epoch for r in first.epochs] == [0, 1] and first.stop_reason is None
    result = fit(new_vae(config(**STILL), data), data, config(**STILL), out_dir=out, resume=True)
    assert result.losses == reference.losses
    assert [r.epoch for r in result.epochs] == [0, 1, 1, 2]
    assert result.stop_reason == reference.stop_reason


def test_resuming_an_early_stopped_run_trains_nothing(data, stopped, tmp_path):
    _, reference, ref_out = stopped
    out = tmp_path / "run"
    fit(new_vae(config(**STILL), data), data, config(**STILL), out_dir=out)
    before = (out / "metrics.jsonl").read_bytes()
    result = fit(new_vae(config(**STILL), data), data, config(**STILL), out_dir=out, resume=True)
    assert (result.steps, result.losses, result.stop_reason) == (
        reference.steps,
        reference.losses,
        reference.stop_reason,
    )
    assert (out / "metrics.jsonl").read_bytes() == before


# -- TensorBoard ---------------------------------------------------------------------------------------------------

TAGS = {
    "train/elbo": "train_elbo",
    "test/elbo": "test_elbo",
    "test/reconstruction": "test_reconstruction",
    "test/kl": "test_kl",
    "train/kl_weight": "kl_weight",
    "train/grad_norm": "grad_norm",
    "train/lr": "lr",
}


def scalars(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_scalars_match_the_metrics(out, losses):
    """TensorBoard stores float32: each scalar equals its metrics.jsonl value rounded to float32, at its step."""
    found, lines = scalars(out), metrics(out)
    for tag, key in TAGS.items():
        assert found[tag] == [(line["step"], float(np.float32(line[key]))) for line in lines], tag
    every = [s for s in range(1, len(losses) + 1) if s % 10 == 0]
    assert found["train/minibatch_elbo"] == [(s, float(np.float32(-losses[s - 1]))) for s in every]


def test_tensorboard_scalars_equal_the_metrics_log(data, tmp_path):
    cfg, out = config(tensorboard=True, kl_schedule="linear:10"), tmp_path / "run"  # a KL weight to log
    result = fit(new_vae(cfg, data), data, cfg, out_dir=out)
    assert [s for s, _ in scalars(out)["test/elbo"]] == [4, 8, 12]
    assert_scalars_match_the_metrics(out, result.losses)


def test_tensorboard_after_a_crash_and_resume_has_each_step_once(data, tmp_path):
    """The crashed run wrote epoch 2's minibatch point (step 10) after its last checkpoint (step 8); the resumed
    run's purge_step drops it, so every tag holds each step once, with the resumed run's values."""
    cfg, out = config(tensorboard=True, kl_schedule="linear:10"), tmp_path / "run"
    with pytest.raises(Crash):
        fit(new_vae(cfg, data), data, cfg, out_dir=out, callbacks=[CrashAt(step=11)])
    result = fit(new_vae(cfg, data), data, cfg, out_dir=out, resume=True)
    assert [line["epoch"] for line in metrics(out)] == [0, 1, 2]
    assert_scalars_match_the_metrics(out, result.losses)


def hide_tensorboard(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError


def test_without_tensorboard_one_line_and_no_run_directory(data, tmp_path, monkeypatch):
    hide_tensorboard(monkeypatch)
    cfg, out = config(tensorboard=True), tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        fit(new_vae(cfg, data), data, cfg, out_dir=out)
    message = str(info.value)
    assert "\n" not in message and 'pip install "pyro_vae[tensorboard]"' in message
    assert not out.exists()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_tensorboard_directory(data, tmp_path):
    class FailAtStart:
        def on_fit_start(self, loop):
            raise Crash("refused in on_fit_start")

    cfg, out = config(tensorboard=True), tmp_path / "run"
    with pytest.raises(Crash):
        fit(new_vae(cfg, data), data, cfg, out_dir=out, callbacks=[FailAtStart()])
    assert not out.exists()


CLI = ["train", "--n-train", "256", "--n-test", "64", "--epochs", "1", "--batch-size", "64", "--latent-dim", "2"]
CLI += ["--hidden-dims", "32,16", "--threads", "1", "--tensorboard"]


@pytest.mark.slow
def test_cli_tensorboard_flag_writes_the_scalars(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_vae", *CLI, "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert set(TAGS) - {"train/kl_weight"} <= set(scalars(out))  # kl_weight: only with a KL schedule
    assert [s for s, _ in scalars(out)["test/elbo"]] == [N_BATCHES]


@pytest.mark.slow
def test_cli_without_tensorboard_gives_one_line(tmp_path):
    out = tmp_path / "run"
    hide = "import sys; sys.modules['torch.utils.tensorboard'] = None; from pyro_vae.cli import main; "
    proc = subprocess.run(
        [sys.executable, "-c", hide + "sys.exit(main(sys.argv[1:]))", *CLI, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and 'pip install "pyro_vae[tensorboard]"' in errors[0], proc.stderr
    assert not out.exists()


# -- CallbackList --------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, name, log, *, fail_hook=False, fail_close=False):
        self.name, self.log, self.fail_hook, self.fail_close = name, log, fail_hook, fail_close

    def on_epoch_end(self, record):
        self.log.append(("epoch", self.name))
        if self.fail_hook:
            raise Crash(f"hook of {self.name}")

    def close(self):
        self.log.append(("close", self.name))
        if self.fail_close:
            raise OSError(f"close of {self.name}")


def test_callback_list_closes_every_callback_in_reverse_order_when_a_hook_raised():
    log = []
    callbacks = [Recorder("a", log), Recorder("b", log, fail_hook=True), Recorder("c", log), object()]
    with pytest.raises(Crash, match="hook of b"), CallbackList(callbacks) as hooks:
        hooks.on_epoch_end(None)
    assert log == [("epoch", "a"), ("epoch", "b"), ("close", "c"), ("close", "b"), ("close", "a")]


def test_callback_list_reraises_the_first_close_error_and_logs_the_rest(caplog):
    log = []
    callbacks = [Recorder("a", log, fail_close=True), Recorder("b", log, fail_close=True), Recorder("c", log)]
    with caplog.at_level(logging.ERROR, "pyro_vae.callbacks"):
        with pytest.raises(OSError, match="close of b"), CallbackList(callbacks):
            pass
    assert log == [("close", "c"), ("close", "b"), ("close", "a")]
    assert [r.getMessage() for r in caplog.records] == ["a callback's close() failed: OSError: close of a"]


def test_callback_list_lets_the_exception_in_flight_win_over_close_errors(caplog):
    log = []
    callbacks = [Recorder("a", log, fail_close=True), Recorder("b", log, fail_hook=True, fail_close=True)]
    with caplog.at_level(logging.ERROR, "pyro_vae.callbacks"):
        with pytest.raises(Crash, match="hook of b"), CallbackList(callbacks) as hooks:
            hooks.on_epoch_end(None)
    assert log == [("epoch", "a"), ("epoch", "b"), ("close", "b"), ("close", "a")]
    assert [r.getMessage() for r in caplog.records] == [
        "a callback's close() failed: OSError: close of b",
        "a callback's close() failed: OSError: close of a",
    ]


# -- user callbacks and the metrics log ----------------------------------------------------------------------------


def test_plain_objects_with_some_hooks_are_callbacks(data, tmp_path):
    class Epochs:  # only on_epoch_end, no base class
        def __init__(self):
            self.records = []

        def on_epoch_end(self, record):
            self.records.append(record)

    class Steps:  # only on_step_end
        def __init__(self):
            self.states = []

        def on_step_end(self, state):
            self.states.append(state)

    cfg, out, epochs, steps = config(epochs=2), tmp_path / "run", Epochs(), Steps()
    vae = new_vae(cfg, data)
    result = fit(vae, data, cfg, out_dir=out, callbacks=[epochs, steps])
    assert epochs.records == result.epochs and [r.epoch for r in epochs.records] == [0, 1]
    assert all(isinstance(s, StepState) for s in steps.states)
    assert [(s.epoch, s.batch, s.step) for s in steps.states] == [(i // 4, i % 4, i + 1) for i in range(8)]
    assert [s.loss for s in steps.states] == result.losses
    assert all(s.vae is vae and s.optimizer is result.optimizer and s.run_dir == out for s in steps.states)


def test_metrics_log_has_one_line_per_epoch_after_a_crash_and_resume(data, tmp_path):
    """The crash comes after MetricsLog wrote epoch 1's line and before its checkpoint: the resume (from epoch 0's
    checkpoint) cuts the line away and trains epoch 1 again, so each epoch is recorded once."""
    cfg, out = config(), tmp_path / "run"
    with pytest.raises(Crash):
        fit(new_vae(cfg, data), data, cfg, out_dir=out, callbacks=[CrashAt(epoch=1)])
    assert [line["epoch"] for line in metrics(out)] == [0, 1]
    result = fit(new_vae(cfg, data), data, cfg, out_dir=out, resume=True)
    lines = metrics(out)
    assert [line["epoch"] for line in lines] == [0, 1, 2] == [r.epoch for r in result.epochs]
    assert [line["test_elbo"] for line in lines] == [r.test_elbo.mean for r in result.epochs]
