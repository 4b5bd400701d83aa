"""Configs validate themselves and round-trip through plain dicts."""

import json

import pytest

from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.errors import ConfigError


def test_round_trip_through_json():
    cfg = RunConfig(model=ModelConfig(latent_dim=3, hidden_dims=[8, 4], guide_options={"eps": 1e-4}))
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.model.hidden_dims == (8, 4)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: TrainConfig(epochs=0), "epochs must be a positive integer"),
        (lambda: TrainConfig(lr=-1.0), "lr must be a positive finite number"),
        (lambda: TrainConfig(lr=float("nan")), "lr must be a positive finite number"),
        (lambda: TrainConfig(num_particles=0), "num_particles"),
        (lambda: TrainConfig(batch_size=True), "batch_size"),
        (lambda: TrainConfig(device="tpu"), "unknown device 'tpu'; choose one of: auto, cpu, cuda"),
        (lambda: ModelConfig(latent_dim=0), "latent_dim must be a positive integer"),
        (lambda: ModelConfig(hidden_dims=()), "hidden_dims"),
        (lambda: ModelConfig(activation="selu"), "did you mean 'silu'"),
        (lambda: DataConfig(dataset="fashion"), "did you mean 'fashion-mnist'"),
        (lambda: DataConfig(dataset="npz"), "needs a file"),
        (lambda: DataConfig(binarize="dynamc"), "did you mean 'dynamic'"),
        (lambda: RunConfig(data=DataConfig(binarize="none")), "continuous_bernoulli"),
        (lambda: RunConfig.from_dict({"train": {"epoch": 3}}), r"unknown key\(s\) \['epoch'\]"),
        (lambda: RunConfig.from_dict({"trian": {}}), "unknown config section"),
    ],
)
def test_bad_values_name_the_problem(make, words):
    with pytest.raises(ConfigError, match=words):
        make()
