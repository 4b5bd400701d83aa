"""Memory: a long run does not grow, and the check that says so does catch a leak.

The detector measures the resident set size (``/proc/self/statm``, after ``gc.collect()``) after 100 warm-up steps
and again after the measured steps, in a full ``fit`` with a run directory (so the per-epoch evaluation, the
metrics file and the checkpoints are inside the measurement). Each measurement runs in a fresh process: in a
long-lived one (such as the test session), memory that earlier code freed stays resident and a leak can fill it
without growing the resident set, which hides the leak. Loss histories hold Python floats, never tensors, which
would keep their autograd graphs alive.
"""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STATM = Path("/proc/self/statm")
pytestmark = pytest.mark.skipif(not STATM.exists(), reason="reads the resident set size from /proc (Linux)")

WARMUP = 100
LIMIT_MIB = 20.0


def rss_mib() -> float:
    gc.collect()
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(out_dir: str, steps: int, leak_bytes: int) -> dict:
    """The detector, run in this (fresh) process: RSS growth in MiB over ``steps`` steps of a tiny model that follow
    ``WARMUP`` steps; a callback keeps ``leak_bytes`` per step when asked to."""
    import pyro
    import torch

    from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from pyro_vae.data import load_dataset
    from pyro_vae.model import VAE
    from pyro_vae.train import Callback, fit

    class Probe(Callback):
        def __init__(self):
            self.kept, self.rss = [], None

        def on_step_end(self, state):
            if leak_bytes:
                self.kept.append(torch.ones(leak_bytes // 4))  # touched, so resident
            if state.step == WARMUP:
                self.rss = rss_mib()

    data = load_dataset(DataConfig(n_train=2048, n_test=64))  # 64 steps per epoch: few evaluations per step
    cfg = RunConfig(
        model=ModelConfig(latent_dim=2, hidden_dims=(32, 16)),
        train=TrainConfig(epochs=1000, batch_size=32, max_steps=WARMUP + steps, progress=False, threads=1),
    )
    pyro.set_rng_seed(0)
    probe = Probe()
    result = fit(VAE.from_config(cfg.model, data.input_dim), data, cfg, out_dir=out_dir, callbacks=[probe])
    return {
        "growth_mib": rss_mib() - probe.rss,
        "steps": result.steps,
        "losses_are_floats": all(type(v) is float for v in result.losses),
        "records_hold_floats": all(type(r.train_elbo) is float and type(r.grad_norm) is float for r in result.epochs),
    }


def rss_growth(tmp_path, steps, leak_bytes=0) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "run"), str(steps), str(leak_bytes)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["steps"] == WARMUP + steps
    return report


def test_1500_steps_grow_the_resident_set_by_less_than_20_mib(tmp_path):
    report = rss_growth(tmp_path, steps=1500)
    print(f"RSS growth over 1500 steps: {report['growth_mib']:.2f} MiB")
    assert report["growth_mib"] < LIMIT_MIB
    assert report["losses_are_floats"] and report["records_hold_floats"]


def test_the_detector_catches_a_deliberate_leak(tmp_path):
    """A callback that keeps 128 KiB per step leaks 37.5 MiB over 300 steps; the detector sees at least 80 % of it
    (in a fresh process there is no freed memory for the leak to hide in)."""
    leak_bytes, steps = 128 * 1024, 300
    report = rss_growth(tmp_path, steps=steps, leak_bytes=leak_bytes)
    leaked = steps * leak_bytes / 2**20
    print(f"RSS growth with a {leaked:.1f} MiB leak: {report['growth_mib']:.2f} MiB")
    assert report["growth_mib"] > LIMIT_MIB
    assert report["growth_mib"] > 0.8 * leaked


if __name__ == "__main__":
    out, n_steps, leak = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(measure(out, n_steps, leak)))
