"""Memory: a long run does not grow, and the check that says so does catch a leak.

The detector measures the resident set size (``/proc/self/statm``, after ``gc.collect()``) after 100 warm-up steps
and again after the measured steps, in a full ``fit`` with a run directory (so the per-epoch evaluation, the
metrics file and the checkpoints are inside the measurement). Loss histories hold Python floats, never tensors,
which would keep their autograd graphs alive.
"""

import gc
import os
from pathlib import Path

import pyro
import pytest
import torch

from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.model import VAE
from pyro_vae.train import Callback, fit

STATM = Path("/proc/self/statm")
pytestmark = pytest.mark.skipif(not STATM.exists(), reason="reads the resident set size from /proc (Linux)")

WARMUP = 100
LIMIT_MIB = 20.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig(n_train=2048, n_test=64))  # 64 steps per epoch, so few evaluations per step


def rss_mib() -> float:
    gc.collect()
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RSSAt(Callback):
    """Records the resident set size after step ``step``; optionally leaks ``leak_bytes`` per step on purpose."""

    def __init__(self, step, leak_bytes=0):
        self.step, self.leak_bytes = step, leak_bytes
        self.kept = []
        self.rss = None

    def on_step_end(self, state):
        if self.leak_bytes:
            self.kept.append(torch.ones(self.leak_bytes // 4))  # touched, so resident
        if state.step == self.step:
            self.rss = rss_mib()


def rss_growth(data, out_dir, steps, leak_bytes=0):
    """The detector: RSS growth in MiB over ``steps`` steps that follow ``WARMUP`` steps of a tiny model."""
    cfg = RunConfig(
        model=ModelConfig(latent_dim=2, hidden_dims=(32, 16)),
        train=TrainConfig(epochs=1000, batch_size=32, max_steps=WARMUP + steps, progress=False, threads=1),
    )
    pyro.set_rng_seed(0)
    probe = RSSAt(WARMUP, leak_bytes)
    result = fit(VAE.from_config(cfg.model, data.input_dim), data, cfg, out_dir=out_dir, callbacks=[probe])
    growth = rss_mib() - probe.rss
    assert result.steps == WARMUP + steps
    return growth, result


def test_1500_steps_grow_the_resident_set_by_less_than_20_mib(data, tmp_path):
    growth, result = rss_growth(data, tmp_path / "run", steps=1500)
    print(f"RSS growth over 1500 steps: {growth:.2f} MiB")
    assert growth < LIMIT_MIB
    assert all(type(v) is float for v in result.losses)
    assert all(type(r.train_elbo) is float and type(r.grad_norm) is float for r in result.epochs)


def test_the_detector_catches_a_deliberate_leak(data, tmp_path):
    """A callback that keeps 128 KiB per step leaks 37.5 MiB over 300 steps; the detector sees at least 80 % of it
    (allocator slack can only add to the resident set, and tensors this large come from their own mappings)."""
    leak_bytes, steps = 128 * 1024, 300
    growth, _ = rss_growth(data, tmp_path / "run", steps=steps, leak_bytes=leak_bytes)
    leaked = steps * leak_bytes / 2**20
    print(f"RSS growth with a {leaked:.1f} MiB leak: {growth:.2f} MiB")
    assert growth > LIMIT_MIB
    assert growth > 0.8 * leaked
