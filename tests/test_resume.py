"""Bit-exact resume: an interrupted and resumed run equals an uninterrupted one, bit for bit.

On CPU with a fixed thread count, the parameters, the optimiser state and the per-step loss list of a resumed run
are compared with ``torch.equal`` / ``==`` (never ``allclose``) against a run that was never interrupted. The
interruptions are a clean stop at an epoch boundary, a ``max_steps`` stop inside an epoch, a crash (an exception from
a callback) at several steps, a process killed with ``os._exit(137)`` at a chosen step, and (slow) real SIGKILLs at
random moments until the run completes.
"""

import json
import os
import subprocess
import sys
import textwrap

import pyro
import pytest
import torch

from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig, resume_differences
from pyro_vae.data import load_dataset
from pyro_vae.errors import CheckpointError, ConfigError
from pyro_vae.model import VAE
from pyro_vae.train import Callback, fit

SMALL = ModelConfig(latent_dim=2, hidden_dims=(32, 16))
N_TRAIN, N_TEST, BATCH, EPOCHS = 256, 64, 64, 3  # 4 batches per epoch, 12 steps


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig(n_train=N_TRAIN, n_test=N_TEST))


def config(**train):
    defaults = {"epochs": EPOCHS, "batch_size": BATCH, "progress": False, "threads": 1}
    return RunConfig(model=SMALL, train=TrainConfig(**{**defaults, **train}))


def new_vae(cfg, data):
    pyro.set_rng_seed(0)
    return VAE.from_config(cfg.model, data.input_dim)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run."""
    cfg = config()
    vae = new_vae(cfg, data)
    out = tmp_path_factory.mktemp("reference") / "run"
    result = fit(vae, data, cfg, out_dir=out)
    return vae, result, out


def assert_same_state(vae, result, reference):
    ref_vae, ref_result, ref_out = reference
    assert result.losses == ref_result.losses  # Python floats, compared exactly
    assert result.steps == ref_result.steps
    ours, theirs = vae.state_dict(), ref_vae.state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert_equal_trees(result.optimizer.state_dict(), ref_result.optimizer.state_dict())


def assert_equal_trees(a, b, where="optimizer"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_trees(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal_trees(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where  # NaN grad_norm before the first step
    else:
        assert a == b, where


def metrics_without_time(path):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def test_resume_after_a_clean_stop_at_an_epoch_boundary(data, reference, tmp_path):
    out = tmp_path / "run"
    fit(new_vae(config(epochs=1), data), data, config(epochs=1), out_dir=out)
    vae = new_vae(config(), data)
    result = fit(vae, data, config(), out_dir=out, resume=True)  # epochs may grow on resume
    assert_same_state(vae, result, reference)
    assert [r.epoch for r in result.epochs] == [0, 1, 2]
    assert metrics_without_time(out / "metrics.jsonl") == metrics_without_time(reference[2] / "metrics.jsonl")
    mine, theirs = load_checkpoint(out / "last.pt"), load_checkpoint(reference[2] / "last.pt")
    assert torch.equal(mine["rng"]["torch"], theirs["rng"]["torch"])
    assert torch.equal(mine["losses"], theirs["losses"])


def test_resume_after_max_steps_inside_an_epoch(data, reference, tmp_path):
    out = tmp_path / "run"
    first = fit(new_vae(config(max_steps=6), data), data, config(max_steps=6), out_dir=out)
    assert first.steps == 6 and [r.epoch for r in first.epochs] == [0, 1]  # epoch 1 recorded after 2 of 4 batches
    vae = new_vae(config(), data)
    result = fit(vae, data, config(), out_dir=out, resume=True)
    assert_same_state(vae, result, reference)
    assert [r.epoch for r in result.epochs] == [0, 1, 1, 2]  # the partial record of epoch 1 stays in the history


class Crash(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state):
        if state.step == self.step:
            raise Crash(f"simulated crash after step {state.step}")


@pytest.mark.parametrize("crash_at", [1, 4, 6, 11])
def test_resume_after_a_crash_mid_epoch(data, reference, tmp_path, crash_at):
    """fit checkpoints its starting point, and checkpoint_every=1 writes a checkpoint after every step except an
    epoch's last (whose checkpoint follows the evaluation), so the crash after step 4 resumes from step 3, and the
    others from the step before the crash (the crash after step 1 from step 0)."""
    out = tmp_path / "run"
    cfg = config(checkpoint_every=1)
    with pytest.raises(Crash):
        fit(new_vae(cfg, data), data, cfg, out_dir=out, callbacks=[CrashAt(crash_at)])
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == (3 if crash_at == 4 else crash_at - 1)
    vae = new_vae(cfg, data)
    result = fit(vae, data, cfg, out_dir=out, resume=True)
    assert_same_state(vae, result, reference)
    assert metrics_without_time(out / "metrics.jsonl") == metrics_without_time(reference[2] / "metrics.jsonl")


def test_resuming_a_complete_run_does_nothing(data, reference):
    vae = new_vae(config(), data)
    result = fit(vae, data, config(), out_dir=reference[2], resume=True)
    assert_same_state(vae, result, reference)


# A separate process trains with the same settings and dies with os._exit(137) (no cleanup, no atexit, as a SIGKILL
# would) right after a chosen step; the resume happens here, in the test process.
KILLED_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import pyro
    from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from pyro_vae.data import load_dataset
    from pyro_vae.model import VAE
    from pyro_vae.train import Callback, fit

    class Die(Callback):
        def on_step_end(self, state):
            if state.step == int(sys.argv[2]):
                os._exit(137)

    data = load_dataset(DataConfig(n_train={n_train}, n_test={n_test}))
    cfg = RunConfig(
        model=ModelConfig(latent_dim=2, hidden_dims=(32, 16)),
        train=TrainConfig(epochs={epochs}, batch_size={batch}, progress=False, threads=1, checkpoint_every=2),
    )
    pyro.set_rng_seed(0)
    fit(VAE.from_config(cfg.model, data.input_dim), data, cfg, out_dir=sys.argv[1], callbacks=[Die()])
    """
).format(n_train=N_TRAIN, n_test=N_TEST, epochs=EPOCHS, batch=BATCH)


def test_a_process_killed_at_a_chosen_step_resumes_bit_exactly(data, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLED_SCRIPT, str(out), "7"], capture_output=True, timeout=300)
    assert proc.returncode == 137, proc.stderr.decode()
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 6  # checkpoint_every=2
    vae = new_vae(config(checkpoint_every=2), data)
    result = fit(vae, data, config(checkpoint_every=2), out_dir=out, resume=True)
    assert_same_state(vae, result, reference)


def test_resume_refuses_changed_settings_and_data(data, tmp_path):
    out = tmp_path / "run"
    fit(new_vae(config(epochs=1), data), data, config(epochs=1), out_dir=out)
    # .lock is the writer lock's own file (a refused resume held the lock while it checked); the run's files stay.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    changed = config(seed=1, batch_size=32, lr=2e-3, threads=2)
    with pytest.raises(ConfigError) as info:
        fit(new_vae(changed, data), data, changed, out_dir=out, resume=True)
    message = str(info.value)
    for words in ("train.seed: 0 → 1", "train.batch_size: 64 → 32", "train.lr: 0.001 → 0.002", "train.threads: 1 → 2"):
        assert words in message
    assert "--force-resume" in message and "\n" not in message
    other = load_dataset(DataConfig(n_train=N_TRAIN, n_test=N_TEST, binarize="static"))
    with pytest.raises(ConfigError, match=r"data\.binarize: 'dynamic' → 'static'"):
        fit(
            new_vae(config(), other),
            other,
            RunConfig(data=DataConfig(binarize="static"), model=SMALL, train=config().train),
            out_dir=out,
            resume=True,
        )
    fewer = load_dataset(DataConfig(n_train=N_TRAIN - 1, n_test=N_TEST))
    with pytest.raises(ConfigError, match="data fingerprint"):
        fit(new_vae(config(), fewer), fewer, config(), out_dir=out, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before  # nothing was touched
    # Free fields (epochs, max_steps, checkpointing, the non-finite policy) may change.
    assert resume_differences(config().to_dict(), config(epochs=9, max_steps=3, keep_last=4).to_dict()) == []


def test_force_resume_applies_the_new_learning_rate(data, tmp_path):
    out = tmp_path / "run"
    fit(new_vae(config(epochs=1), data), data, config(epochs=1), out_dir=out)
    faster = config(lr=5e-3)
    result = fit(new_vae(faster, data), data, faster, out_dir=out, resume=True, force_resume=True)
    assert [g["lr"] for g in result.optimizer.optimizer.param_groups] == [5e-3]
    assert len(result.losses) == 12


def test_run_directory_safety(data, tmp_path):
    out = tmp_path / "run"
    fit(new_vae(config(epochs=1), data), data, config(epochs=1), out_dir=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match="already holds a run; pass --resume .* --overwrite"):
        fit(new_vae(config(), data), data, config(), out_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ConfigError, match="empty holds no run to resume; start one with --out"):
        fit(new_vae(config(), data), data, config(), out_dir=tmp_path / "empty", resume=True)
    with pytest.raises(ConfigError, match="contradict"):
        fit(new_vae(config(), data), data, config(), out_dir=out, resume=True, overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot create run directory .*file is not a directory"):
        fit(new_vae(config(), data), data, config(), out_dir=tmp_path / "file" / "run")
    result = fit(new_vae(config(epochs=1), data), data, config(epochs=1, keep_last=1), out_dir=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "config.json",
        "last.pt",
        "last.pt.sha256",
        "metrics.jsonl",
    ]
    assert result.steps == 4


def test_resume_from_the_previous_checkpoint_file(data, reference, tmp_path):
    """A damaged last.pt is refused with a pointer to last.prev.pt; resuming from that file works and is exact."""
    out = tmp_path / "run"
    fit(new_vae(config(epochs=2), data), data, config(epochs=2), out_dir=out)
    raw = bytearray((out / "last.pt").read_bytes())
    raw[200] ^= 0xFF
    (out / "last.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"fails its checksum.*resume from it with --resume .*last\.prev\.pt"):
        fit(new_vae(config(), data), data, config(), out_dir=out, resume=True)
    vae = new_vae(config(), data)
    result = fit(vae, data, config(), out_dir=out, resume=out / "last.prev.pt")
    assert_same_state(vae, result, reference)
    assert [p.name for p in out.glob("last.superseded*.pt")] == ["last.superseded-unreadable.pt"]  # kept aside


# A helper process imports the package once, then forks one trainer per attempt (a fresh interpreter would spend
# ~3 s importing torch and Pyro each time): the first attempt starts the run, every later one resumes it with the
# command line. Once a trainer has written a new checkpoint (so that every attempt makes progress, however loaded
# the machine), the helper lets it run for a random while more and SIGKILLs it, until one attempt completes; then it
# trains the same run uninterrupted in one more child, and the test compares the two last.pt files.
KILL_LOOP_SCRIPT = textwrap.dedent(
    """
    import json, os, random, signal, sys, time
    from pathlib import Path
    import torch._dynamo  # torch.optim imports it on first use: ~2 s that every forked trainer would pay again
    import pyro_vae.train
    from pyro_vae import cli

    root = Path(sys.argv[1])
    rng = random.Random(int(sys.argv[2]))
    args = ["train", "--n-train", "256", "--n-test", "64", "--hidden-dims", "32,16", "--latent-dim", "2",
            "--batch-size", "32", "--epochs", "40", "--threads", "1", "--checkpoint-every", "5", "--no-figures"]


    def child(argv):
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os._exit(cli.main(argv))
        return pid


    def signature(path):
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns


    kills, attempts = 0, 0
    run = root / "killed"
    last = run / "last.pt"
    while attempts < 30:
        attempts += 1
        before = signature(last)
        started = before is not None
        pid = child(args + (["--resume", str(run)] if started else ["--out", str(run), "--overwrite"]))
        done, status = 0, 0
        deadline = time.monotonic() + 120
        while signature(last) == before and time.monotonic() < deadline:  # until a new checkpoint is written
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.005)
        if not done:
            # Kill soon after the new checkpoint, at a random moment: every attempt makes progress, and a fast
            # machine cannot finish the whole run inside the delay (which made kills too rare to count).
            time.sleep(rng.uniform(0.0, 0.05))
            done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break  # finished before the kill
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            break  # finished just before the kill landed
        kills += 1
    else:  # out of attempts while still killing: let the run finish
        _, status = os.waitpid(child(args + ["--resume", str(run)]), 0)
    code = os.waitstatus_to_exitcode(status)
    _, ref_status = os.waitpid(child(args + ["--out", str(root / "reference")]), 0)
    ref_code = os.waitstatus_to_exitcode(ref_status)
    print(json.dumps({"kills": kills, "attempts": attempts, "code": code, "ref_code": ref_code}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill loop forks its trainers (POSIX)")
def test_random_sigkills_until_the_run_completes_resume_bit_exactly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", KILL_LOOP_SCRIPT, str(tmp_path), "0"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    print(stats)
    assert stats["code"] == 0 and stats["ref_code"] == 0
    assert stats["kills"] >= 3, stats  # the run really was killed, several times
    killed, ref = load_checkpoint(tmp_path / "killed" / "last.pt"), load_checkpoint(tmp_path / "reference" / "last.pt")
    assert killed["progress"] == ref["progress"]
    assert torch.equal(killed["losses"], ref["losses"])
    assert_equal_trees(killed["model"], ref["model"], "model")
    assert_equal_trees(killed["optimizer"], ref["optimizer"])
    assert torch.equal(killed["rng"]["torch"], ref["rng"]["torch"])
    assert metrics_without_time(tmp_path / "killed" / "metrics.jsonl") == metrics_without_time(
        tmp_path / "reference" / "metrics.jsonl"
    )


def test_resume_flags_apply_on_top_of_the_saved_config(tmp_path):
    """--resume starts from the checkpoint's config; a --config file changes only the keys it names, flags after."""
    from pyro_vae import cli

    saved = config(epochs=2, batch_size=32, seed=5)
    (tmp_path / "more.json").write_text(json.dumps({"train": {"epochs": 7}}))
    argv = ["train", "--resume", "DIR", "--config", str(tmp_path / "more.json"), "--keep-last", "3"]
    argv += ["--checkpoint-every", "5", "--on-nonfinite", "skip", "--max-skips", "4"]
    merged = cli.config_from_args(cli.build_parser().parse_args(argv), base=saved)
    assert merged.model == saved.model and merged.data == saved.data
    train = merged.train
    assert (train.epochs, train.batch_size, train.seed, train.threads) == (7, 32, 5, 1)
    assert (train.keep_last, train.checkpoint_every, train.on_nonfinite, train.max_skips) == (3, 5, "skip", 4)
    assert resume_differences(saved.to_dict(), merged.to_dict()) == []


def test_force_resume_cannot_change_the_architecture(data, tmp_path):
    """Issue 11 defect 8: --force-resume after a change of latent size was a load_state_dict traceback."""
    out = tmp_path / "run"
    fit(new_vae(config(epochs=1), data), data, config(epochs=1), out_dir=out)
    wider = RunConfig(model=ModelConfig(latent_dim=3, hidden_dims=(32, 16)), train=config().train)
    with pytest.raises(CheckpointError) as err:
        fit(new_vae(wider, data), data, wider, out_dir=out, resume=True, force_resume=True)
    message = str(err.value)
    assert "\n" not in message and "another architecture" in message and "--out or --overwrite" in message


def test_resuming_past_max_steps_without_a_larger_max_steps_is_refused(data, tmp_path):
    """Issue 11 defect 13: `--resume D --epochs 6` after a --max-steps run silently did 0 steps."""
    out = tmp_path / "run"
    fit(new_vae(config(max_steps=6), data), data, config(max_steps=6), out_dir=out)
    with pytest.raises(ConfigError, match=r"already took 6 steps and max_steps is 6; pass a larger --max-steps"):
        fit(new_vae(config(), data), data, config(epochs=6, max_steps=6), out_dir=out, resume=True)
    result = fit(new_vae(config(), data), data, config(epochs=6, max_steps=10), out_dir=out, resume=True)
    assert result.steps == 10
