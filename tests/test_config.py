"""Configs validate themselves and round-trip through plain dicts."""

import dataclasses
import json

import pytest

from pyro_vae.config import (
    SECTIONS,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    check_float,
    check_int,
    resume_differences,
    resume_free_fields,
)
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


# Each field is checked against its annotation and metadata: a JSON config with a null or wrong-typed value gets one
# line naming the field, what was expected and the value (defect 8 of the training-core issue).
WRONG_TYPES = {
    "threshold as text": ({"data": {"threshold": "0.5"}}, r"threshold must be a number in \(0.0, 1.0\), got '0.5'"),
    "hidden_dims null": ({"model": {"hidden_dims": None}}, "hidden_dims must be a list of integers, got null"),
    "hidden width text": ({"model": {"hidden_dims": [8, "4"]}}, "every entry of hidden_dims must be a positive"),
    "guide number": ({"model": {"guide": 3}}, "guide must be a string, got 3"),
    "likelihood null": ({"model": {"likelihood": None}}, "likelihood must be a string, got null"),
    "progress text": ({"train": {"progress": "no"}}, "progress must be true, false or null, got 'no'"),
    "tensorboard number": ({"train": {"tensorboard": 1}}, "tensorboard must be true or false, got 1"),
    "epochs float": ({"train": {"epochs": 2.0}}, "epochs must be a positive integer, got 2.0"),
    "lr text": ({"train": {"lr": "1e-3"}}, "lr must be a positive finite number, got '1e-3'"),
    "data_dir number": ({"data": {"data_dir": 5}}, "data_dir must be a string, got 5"),
    "guide_options list": ({"model": {"guide_options": [1]}}, "guide_options must be a mapping, got list"),
    "seed too large": ({"train": {"seed": 2**32}}, r"seed must be at most 4294967295 \(numpy seeds are 32-bit\)"),
    "seed negative": ({"train": {"seed": -1}}, "seed must be an integer >= 0, got -1"),
    "latent_dim huge": ({"model": {"latent_dim": 10**9}}, r"latent_dim must be at most 4096 \(a full-rank guide"),
    "hidden width huge": ({"model": {"hidden_dims": [10**9]}}, "every entry of hidden_dims must be at most 16384"),
    "batch huge": ({"train": {"batch_size": 2**40}}, "batch_size must be at most 1048576"),
    "particles huge": ({"train": {"num_particles": 10**6}}, "num_particles must be at most 4096"),
    "keep_last huge": ({"train": {"keep_last": 10**6}}, "keep_last must be at most 100"),
    "early_stop 0": ({"train": {"early_stop": 0}}, "early_stop must be a positive integer, got 0"),
    "min delta negative": (
        {"train": {"early_stop_min_delta": -0.1}},
        "early_stop_min_delta must be a finite number >= 0",
    ),
    "compile text": ({"train": {"compile": "yes"}}, "compile must be true or false, got 'yes'"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_every_field_is_type_checked(case):
    raw, words = WRONG_TYPES[case]
    with pytest.raises(ConfigError, match=words) as info:
        RunConfig.from_dict(raw)
    assert "\n" not in str(info.value)


def test_every_field_has_help_and_a_flag_or_a_reason():
    for klass in SECTIONS.values():
        for f in dataclasses.fields(klass):
            assert f.metadata.get("help"), f"{klass.__name__}.{f.name} has no help"
            if f.metadata.get("flag", "") is None:
                assert f.metadata.get("reason"), f"{klass.__name__}.{f.name} has no flag and no reason"


def test_new_train_fields_default_and_round_trip():
    train = TrainConfig()
    assert (train.tensorboard, train.early_stop, train.early_stop_min_delta, train.compile) == (False, None, 0.0, False)
    cfg = RunConfig(train=TrainConfig(tensorboard=True, early_stop=3, early_stop_min_delta=0.5, compile=True))
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (True, {"low": 0}, "n must be an integer >= 0, got True"),
        (1.0, {}, "n must be an integer, got 1.0"),
        (0, {"low": 1}, "n must be a positive integer, got 0"),
        (None, {"low": 1}, "n must be a positive integer, got None"),
        (11, {"low": 1, "high": 10, "why": "ten fingers"}, r"n must be at most 10 \(ten fingers\), got 11"),
    ],
)
def test_check_int_refuses(value, kwargs, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        check_int("n", value, **kwargs)


def test_check_int_and_check_float_accept():
    assert check_int("n", 10, low=1, high=10) == 10
    assert check_int("n", None, allow_none=True) is None
    assert check_float("x", 1, low=0, open_low=True) == 1  # a JSON integer is a number
    assert check_float("x", 0.0, low=0.0) == 0.0


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (False, {}, "x must be a finite number, got False"),
        (float("inf"), {}, "x must be a finite number, got inf"),
        (0.0, {"low": 0.0, "open_low": True}, "x must be a positive finite number, got 0.0"),
        (1.0, {"low": 0.0, "high": 1.0, "open_high": True}, r"x must be a number in \[0.0, 1.0\), got 1.0"),
        ("0.5", {"low": 0.0}, "x must be a finite number >= 0, got '0.5'"),
    ],
)
def test_check_float_refuses(value, kwargs, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        check_float("x", value, **kwargs)


def test_resume_free_fields_come_from_the_metadata():
    """The fields a resume may change: train.py's former RESUME_FREE_FIELDS plus the four new training options."""
    assert resume_free_fields() == {
        "data": {"data_dir"},
        "model": set(),
        "train": {"epochs", "max_steps", "progress", "checkpoint_every", "keep_last", "on_nonfinite", "max_skips"}
        | {"tensorboard", "early_stop", "early_stop_min_delta", "compile"},
    }


def test_resume_differences_lists_fixed_fields_only():
    saved = RunConfig().to_dict()
    free = RunConfig(train=TrainConfig(epochs=9, keep_last=5, early_stop=2, tensorboard=True)).to_dict()
    assert resume_differences(saved, free) == []
    fixed = RunConfig(model=ModelConfig(latent_dim=3), train=TrainConfig(seed=4)).to_dict()
    assert resume_differences(saved, fixed) == ["model.latent_dim: 16 → 3", "train.seed: 0 → 4"]
    # A checkpoint older than a field compares as the field's default.
    del saved["train"]["compile"]
    assert resume_differences(saved, RunConfig().to_dict()) == []
