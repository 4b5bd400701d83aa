"""fit(): the SVI loop, its records, and the run directory it writes."""

import json
import math

import pytest
import torch

from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.model import VAE
from pyro_vae.train import fit

SMALL = ModelConfig(latent_dim=2, hidden_dims=(32, 16))


@pytest.fixture(scope="module")
def small_data():
    return load_dataset(DataConfig(n_train=256, n_test=64))


def config(**train):
    return RunConfig(model=SMALL, train=TrainConfig(**{"epochs": 2, "batch_size": 64, "progress": False, **train}))


def test_fit_writes_a_run_directory(small_data, tmp_path):
    cfg = config()
    vae = VAE.from_config(cfg.model, small_data.input_dim)
    result = fit(vae, small_data, cfg, out_dir=tmp_path)
    assert result.steps == 2 * 4 and len(result.losses) == 8
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.losses)
    assert [e.epoch for e in result.epochs] == [0, 1]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert RunConfig.from_dict(saved["config"]) == cfg
    assert saved["environment"]["threads"] >= 1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1]
    assert lines[-1]["test_elbo"] == pytest.approx(result.test_elbo.mean)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(payload["model"]) == set(vae.state_dict())
    restored = VAE.from_config(cfg.model, small_data.input_dim)
    restored.load_state_dict(load_checkpoint(tmp_path / "last.pt")["model"])
    for p, q in zip(restored.parameters(), vae.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_fit_is_reproducible(small_data):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        cfg = config(epochs=1)
        vae = VAE.from_config(cfg.model, small_data.input_dim)
        runs.append(fit(vae, small_data, cfg).losses)
    assert runs[0] == runs[1]


def test_max_steps_and_training_improves(small_data):
    cfg = config(epochs=50, max_steps=60, lr=3e-3)
    vae = VAE.from_config(cfg.model, small_data.input_dim)
    result = fit(vae, small_data, cfg)
    assert result.steps == 60
    assert sum(result.losses[-8:]) / 8 < sum(result.losses[:8]) / 8 - 50


def test_batch_larger_than_data_is_refused_before_training(small_data):
    cfg = config(batch_size=1000)
    vae = VAE.from_config(cfg.model, small_data.input_dim)
    with pytest.raises(DataError, match="batch size 1000"):
        fit(vae, small_data, cfg)


def test_meanfield_objective_and_continuous_bernoulli(small_data):
    cfg = RunConfig(
        data=DataConfig(binarize="none"),
        model=ModelConfig(latent_dim=2, hidden_dims=(32, 16), likelihood="continuous_bernoulli"),
        train=TrainConfig(epochs=1, batch_size=64, objective="meanfield", num_particles=2, progress=False),
    )
    vae = VAE.from_config(cfg.model, small_data.input_dim)
    result = fit(vae, small_data, cfg)
    assert math.isfinite(result.test_elbo.mean)


def test_config_that_contradicts_the_vae_is_refused(small_data):
    from pyro_vae.errors import ConfigError

    vae = VAE(small_data.input_dim, latent_dim=3, hidden_dims=(32, 16))
    with pytest.raises(ConfigError, match=r"latent_dim \(2 in the config, 3 in the VAE\)"):
        fit(vae, small_data, config(epochs=1))
    from pyro_vae.train import _consistent_config

    assert _consistent_config(vae, None).model == vae.config  # without a config, the VAE describes itself


def test_a_vae_built_for_other_data_is_refused_before_anything_is_written(small_data, tmp_path):
    """Same number of values, other layout: a VAE built for (1, 14, 56) images must not silently train on (1, 28, 28)
    ones; a VAE for other sizes is refused too. Both before the run directory exists."""
    cfg = config(epochs=1)
    wrong_shape = VAE(784, latent_dim=2, hidden_dims=(32, 16), image_shape=(1, 14, 56))
    with pytest.raises(ConfigError, match=r"images of shape \(1, 28, 28\) but the VAE was built for \(1, 14, 56\)"):
        fit(wrong_shape, small_data, cfg, out_dir=tmp_path / "a")
    wrong_size = VAE(100, latent_dim=2, hidden_dims=(32, 16))
    with pytest.raises(ConfigError, match="the data have 784 values per image but the VAE expects 100"):
        fit(wrong_size, small_data, cfg, out_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert VAE(784, latent_dim=2, hidden_dims=(8,), image_shape=(28, 28)).image_shape == (1, 28, 28)  # legacy (H, W)
