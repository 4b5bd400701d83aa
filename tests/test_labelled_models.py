"""The CVAE and M2 (:mod:`pyro_vae.labelled`) against independent references.

* M2's enumerated loss is the textbook bound of Kingma et al. (2014), formed here by hand in float64 from the raw
  network outputs and the same draws: the unlabelled U(x), the labelled L(x, y) + α log q(y | x), each scaled by its
  plate's N / B;
* importance-sampled log p(x) (M2, y summed out) and log p(x | y) (CVAE) of a linear-Gaussian decoder against the
  closed-form Gaussian mixture from scipy, within a tolerance derived from the estimate's standard error;
* every registered guide family as q(z | x, y), :class:`~pyro_vae.labelled.conditioning.BatchReshaped`, sampling by
  class, the one-line refusals, :func:`~pyro_vae.labelled.build_model` and training end to end with bit-exact resume.
"""

import contextlib
import dataclasses
import json
import logging
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from scipy import stats
from test_resume import Crash, CrashAt
from torch import nn

from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import binarize_eval, labels_fingerprint, load_dataset
from pyro_vae.data.labels import num_classes, select_labelled
from pyro_vae.errors import ConfigError, DataError, NonFiniteLossError
from pyro_vae.guides import FlowFamily, family_names, make_family
from pyro_vae.labelled import CVAE, SSVAE, LabelledPart, build_model
from pyro_vae.labelled.conditioning import BatchReshaped
from pyro_vae.labelled.evaluation import accuracy, evaluate_labelled, evaluate_labelled_elbo
from pyro_vae.model import VAE
from pyro_vae.objectives import make_objective
from pyro_vae.step import TrainStep
from pyro_vae.train import fit

C, L, D = 3, 2, 6  # classes, latent dimensions, pixels of the small models
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def raises_one_line(error, match, fn, *args, **kwargs):
    """Call ``fn``; it must raise ``error`` whose message is one line containing every word of ``match``."""
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for word in match:
        assert word in message, (word, message)
    return message


def small(cls, *, seed=0, **kwargs):
    pyro.set_rng_seed(seed)
    if cls is SSVAE:
        kwargs.setdefault("aux_weight", 0.7)
    return cls(D, C, latent_dim=L, hidden_dims=(8,), **kwargs)


def binary(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).bernoulli(
        generator=torch.Generator().manual_seed(seed + 1)
    )


# ----------------------------------------------------------------------------------------------------------------
# M2's enumerated loss is the textbook bound
def hand_terms(model, x, y, z):
    """Per image, log p(x | z, y) + log p(z) − log q(z | x, y) − log C from the raw network outputs: the encoder's
    ``[loc, softplus⁻¹(scale − eps)]`` of ``mvn_diag``, the decoder's Bernoulli logits, a standard-normal prior.

    :param x: ``(B, D)``; ``y``: ``(B,)``; ``z``: ``(B, L)``.
    """
    code = F.one_hot(y, C).to(x.dtype)
    raw = model.encoder(torch.cat([x, code], -1))
    loc, scale = raw[:, :L], F.softplus(raw[:, L:]) + model.family.eps
    log_q = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - HALF_LOG_2PI).sum(-1)
    log_prior = (-0.5 * z**2 - HALF_LOG_2PI).sum(-1)
    logits = model.decoder(torch.cat([z, code], -1))
    log_lik = (x * logits - F.softplus(logits)).sum(-1)
    return log_lik + log_prior - log_q - math.log(C)


def unlabelled_bound(model, x, z):
    """U(x) per image: Σ_c q(c | x) [terms(x, c, z_c)] + H[q(y | x)], with ``z (C, B, L)`` one draw per class."""
    log_q_y = F.log_softmax(model.classifier(x), -1)  # (B, C)
    per_class = torch.stack([hand_terms(model, x, torch.full((x.shape[0],), c), z[c]) for c in range(C)], -1)
    return (log_q_y.exp() * (per_class - log_q_y)).sum(-1)


def labelled_bound(model, x, y, z):
    """L(x, y) + α log q(y | x) per image."""
    log_q_y = F.log_softmax(model.classifier(x), -1).gather(-1, y[:, None])[:, 0]
    return hand_terms(model, x, y, z) + model.aux_weight * log_q_y


def enumerated_loss(model, *args, **kwargs):
    return make_objective("trace", enumerate=True).loss(model.model, model.guide, *args, **kwargs)


def test_m2_objective_is_trace_enum_with_one_plate_dimension():
    elbo = make_objective("trace", enumerate=True)
    assert isinstance(elbo, pyro.infer.TraceEnum_ELBO) and elbo.max_plate_nesting == 1


def test_m2_unlabelled_loss_is_the_textbook_bound(float64):
    model = small(SSVAE).double()
    x = binary(5, D).double()
    pyro.set_rng_seed(3)
    loss = enumerated_loss(model, x)
    pyro.set_rng_seed(3)  # the guide's only random draw: one z per (class, image), from q(z | x, c)
    with torch.no_grad():
        z = model.encode(x, torch.arange(C)[:, None]).rsample()  # (C, B, L)
        expected = -unlabelled_bound(model, x, z).sum()
    assert z.shape == (C, 5, L)
    assert loss == pytest.approx(expected.item(), rel=1e-12)


def test_m2_labelled_loss_is_the_bound_plus_the_classification_term_scaled_by_n_over_b(float64):
    model = small(SSVAE).double()
    x, y = binary(4, D).double(), torch.tensor([0, 2, 1, 2])
    n = 10  # the labelled set's size: every term is scaled by N / B = 2.5
    pyro.set_rng_seed(4)
    observed = enumerated_loss(model, x, n, torch.tensor([1, 4, 5, 9]), y=y)
    pyro.set_rng_seed(4)
    part = enumerated_loss(model, None, labelled=LabelledPart(x, y, n, torch.tensor([1, 4, 5, 9])))
    pyro.set_rng_seed(4)
    with torch.no_grad():
        expected = -(n / 4) * labelled_bound(model, x, y, model.encode(x, y).rsample()).sum()
    assert observed == pytest.approx(expected.item(), rel=1e-12)
    assert part == pytest.approx(expected.item(), rel=1e-12)


def test_m2_mixed_step_adds_both_bounds_each_with_its_own_scale(float64):
    model = small(SSVAE).double()
    xu, xl, y = binary(5, D, seed=1).double(), binary(3, D, seed=2).double(), torch.tensor([2, 0, 0])
    nu, nl = 50, 7
    labelled = LabelledPart(xl, y, nl, torch.tensor([0, 3, 6]))
    pyro.set_rng_seed(5)
    loss = enumerated_loss(model, xu, nu, torch.arange(5), labelled=labelled)
    pyro.set_rng_seed(5)  # the guide draws the unlabelled z first, then z_labelled
    with torch.no_grad():
        zu = model.encode(xu, torch.arange(C)[:, None]).rsample()
        zl = model.encode(xl, y).rsample()
        expected = -(nu / 5) * unlabelled_bound(model, xu, zu).sum() - (nl / 3) * labelled_bound(model, xl, y, zl).sum()
    assert loss == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("guide", ["mvn_diag", "diag_normal"])
@pytest.mark.parametrize("objective", ["trace", "meanfield"])
def test_cvae_loss_is_the_conditional_elbo_scaled_by_n_over_b(float64, objective, guide):
    """−(N/B) Σ_b [log p(x | z, y) + log p(z) − log q(z | x, y)]: no term for y, which is given. ``meanfield`` puts
    the closed-form KL in place of log q − log p where the VAE's q(z | x) has one (``diag_normal``), and keeps the
    sampled one where it has none (``mvn_diag``), as for the VAE."""
    model = small(CVAE, guide=guide).double()
    x, y = binary(4, D).double(), torch.tensor([1, 0, 2, 2])
    pyro.set_rng_seed(9)
    loss = make_objective(objective).loss(model.model, model.guide, x, 10, torch.tensor([0, 2, 4, 6]), y=y)
    pyro.set_rng_seed(9)
    with torch.no_grad():
        z = model.encode(x, y).rsample()
        sampled = -(10 / 4) * (hand_terms(model, x, y, z) + math.log(C)).sum()  # hand_terms has M2's −log C
        code = F.one_hot(y, C).double()
        raw = model.encoder(torch.cat([x, code], -1))
        loc, scale = raw[:, :L], F.softplus(raw[:, L:]) + model.family.eps
        kl = 0.5 * (loc**2 + scale**2 - 1 - 2 * scale.log()).sum(-1)  # KL(N(loc, scale²) ‖ N(0, I))
        logits = model.decoder(torch.cat([z, code], -1))
        closed_form = -(10 / 4) * ((x * logits - F.softplus(logits)).sum(-1) - kl).sum()
    vae = VAE(D, latent_dim=L, hidden_dims=(8,), guide=guide)
    vae_has_closed_form = guide == "diag_normal"
    with pytest.raises(NotImplementedError) if not vae_has_closed_form else contextlib.nullcontext():
        torch.distributions.kl_divergence(vae.encode(binary(4, D)), vae.prior(4, binary(4, D)))
    expected = closed_form if objective == "meanfield" and vae_has_closed_form else sampled
    assert loss == pytest.approx(expected.item(), rel=1e-12)


def test_m2_gradients_are_the_textbook_bound_s(float64):
    """TraceEnum_ELBO's differentiable loss has the hand-written bound's gradient for every parameter: the encoder's
    through the reparameterised z, the decoder's, and the classifier's through q(y | x) (enumerated weights and
    entropy) and the α log q(y | x) term."""
    model = small(SSVAE).double()
    xu, xl, y = binary(5, D, seed=1).double(), binary(3, D, seed=2).double(), torch.tensor([2, 0, 1])
    labelled = LabelledPart(xl, y, 7, torch.tensor([0, 3, 6]))
    elbo = make_objective("trace", enumerate=True)
    pyro.set_rng_seed(8)
    elbo.differentiable_loss(model.model, model.guide, xu, 50, torch.arange(5), labelled=labelled).backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    pyro.set_rng_seed(8)
    zu = model.encode(xu, torch.arange(C)[:, None]).rsample()
    zl = model.encode(xl, y).rsample()
    (-(50 / 5) * unlabelled_bound(model, xu, zu).sum() - (7 / 3) * labelled_bound(model, xl, y, zl).sum()).backward()
    assert any(name.startswith("classifier.") for name in got)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
        assert p.grad.abs().sum() > 0, name  # every network is trained by this step


# ----------------------------------------------------------------------------------------------------------------
# BatchReshaped
def test_batch_reshaped_scores_as_its_base_on_the_flattened_value():
    loc = torch.randn(6, L, requires_grad=True)
    base = dist.Normal(loc, torch.rand(6, L) + 0.5).to_event(1)
    q = BatchReshaped(base, torch.Size([2, 3]))
    assert (q.batch_shape, q.event_shape) == ((2, 3), (L,))
    value = torch.randn(2, 3, L)
    torch.testing.assert_close(q.log_prob(value), base.log_prob(value.reshape(6, L)).reshape(2, 3), rtol=0, atol=0)
    torch.testing.assert_close(q.mean, loc.reshape(2, 3, L), rtol=0, atol=0)
    drawn = q.rsample((5,))
    assert drawn.shape == (5, 2, 3, L) and q.sample((4,)).shape == (4, 2, 3, L) and q.sample().shape == (2, 3, L)
    expected = base.log_prob(drawn.reshape(5, 6, L)).reshape(5, 2, 3)
    torch.testing.assert_close(q.log_prob(drawn), expected, rtol=0, atol=0)  # its own sample (the cached path)
    torch.testing.assert_close(q.log_prob(drawn.clone()), expected, rtol=0, atol=0)  # any other tensor
    drawn.sum().backward()
    torch.testing.assert_close(loc.grad, torch.full((6, L), 5.0))  # d/dloc of loc + scale·ε, 5 draws
    assert q.has_rsample and q.expand((2, 3)) is q
    with pytest.raises(ValueError, match="cannot expand"):
        q.expand((4, 3, 3))


@pytest.mark.parametrize(
    "shape, target",
    [((2, 3), (4, 2, 3)), ((3, 1, 2), (3, 4, 2)), ((3, 1, 2), (5, 3, 4, 2)), ((1, 2), (3, 2))],
)
def test_batch_reshaped_expands_with_a_draw_for_every_new_position(shape, target):
    """Pyro's particle plate expands q(z | x, y): ``(B,)`` to ``(P, B)``, an enumerated ``(C, 1, B)`` to
    ``(C, P, B)``. Reference: the same Normal built unflattened, ``(*shape, L)``, and expanded by torch."""
    n = math.prod(shape)
    loc, scale = torch.randn(n, L, requires_grad=True), torch.rand(n, L) + 0.5
    q = BatchReshaped(dist.Normal(loc, scale).to_event(1), torch.Size(shape)).expand(target)
    reference = dist.Normal(loc.reshape(*shape, L), scale.reshape(*shape, L)).to_event(1).expand(target)
    assert q.batch_shape == target and q.event_shape == (L,)
    value = torch.randn(7, *target, L)
    torch.testing.assert_close(q.log_prob(value), reference.log_prob(value))
    torch.testing.assert_close(q.mean, reference.mean)
    drawn = q.rsample((2,))
    assert drawn.shape == (2, *target, L)
    torch.testing.assert_close(q.log_prob(drawn), reference.log_prob(drawn))  # the cached path, same layout
    # Every expanded position has its own draw: no two of the 2·prod(target) noise vectors coincide.
    noise = ((drawn - reference.mean) / reference.base_dist.scale).reshape(-1, L)
    assert torch.unique(noise, dim=0).shape[0] == noise.shape[0]
    drawn.sum().backward()
    torch.testing.assert_close(loc.grad, torch.full((n, L), 2.0 * math.prod(target) / n))
    twice = q.expand((2, *target))  # a second expansion composes with the first
    value = torch.randn(2, *target, L)
    torch.testing.assert_close(twice.log_prob(value), reference.expand((2, *target)).log_prob(value))


@pytest.mark.parametrize("shape, target", [((4,), (4,)), ((4,), (3, 4)), ((3, 1, 2), (3, 4, 2))])
def test_batch_reshaped_has_its_base_s_closed_form_kl_against_the_standard_prior(shape, target):
    n = math.prod(shape)
    loc, scale = torch.randn(n, L), torch.rand(n, L) + 0.5
    q = BatchReshaped(dist.Normal(loc, scale).to_event(1), torch.Size(shape)).expand(target)
    reference = dist.Normal(loc.reshape(*shape, L), scale.reshape(*shape, L)).to_event(1).expand(target)
    prior = dist.Normal(torch.zeros(L), 1.0).expand(target[-1:] + (L,)).to_event(1)  # the plate's (B,), broadcast
    kl = torch.distributions.kl_divergence(q, prior)
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(reference, prior.expand(target)))
    with pytest.raises(NotImplementedError):  # no closed form against anything else: Pyro then samples the KL
        torch.distributions.kl_divergence(q, dist.Laplace(torch.zeros(L), 1.0).to_event(1))


# ----------------------------------------------------------------------------------------------------------------
# CVAE: sampling by class, and the refusals
def class_only_decoder(model):
    """A decoder that reads only the one-hot part of ``[z, onehot(y)]``: class k's mean image is sigmoid(w_k + b)."""
    decoder = nn.Linear(L + C, D)
    with torch.no_grad():
        decoder.weight[:, :L] = 0.0
    model.decoder = decoder
    with torch.no_grad():
        return torch.sigmoid(decoder.weight[:, L:].T + decoder.bias)  # (C, D): row k is class k's mean image


@pytest.mark.parametrize("cls", [CVAE, SSVAE])
def test_sample_uses_the_label_asked_for(cls):
    model = small(cls)
    class_means = class_only_decoder(model)
    assert not torch.allclose(class_means[0], class_means[1])
    for k in range(C):
        torch.testing.assert_close(model.sample(4, label=k), class_means[k].expand(4, D))
    balanced = model.sample(2 * C + 1)  # i mod C
    torch.testing.assert_close(balanced, class_means[torch.arange(2 * C + 1) % C])


def test_sample_with_the_real_decoder_depends_on_the_label_and_the_generator():
    model = small(CVAE)
    a = model.sample(3, torch.Generator().manual_seed(1), label=0)
    assert torch.equal(a, model.sample(3, torch.Generator().manual_seed(1), label=0))
    assert not torch.equal(a, model.sample(3, torch.Generator().manual_seed(1), label=1))


@pytest.mark.parametrize(
    "label, words",
    [(C, ["label must be at most 2", "3 classes"]), (-1, ["label must be an integer >= 0"]), (1.5, ["got 1.5"]),
     ("2", ["got '2'"])],
)  # fmt: skip
def test_sample_refuses_a_label_out_of_range_in_one_line(label, words):
    raises_one_line(ConfigError, words, small(CVAE).sample, 4, label=label)


def test_cvae_needs_labels_to_encode_decode_reconstruct_and_evaluate():
    model, x = small(CVAE), binary(3, D)
    raises_one_line(ConfigError, ["pass the labels y"], model.encode, x)
    raises_one_line(ConfigError, ["pass the labels y"], model.reconstruct, x)
    raises_one_line(ConfigError, ["labels y"], model.decode, torch.zeros(3, L))
    raises_one_line(DataError, ["integer tensor of labels 0..2"], evaluate_labelled, model, x, None, ks=(1,))
    raises_one_line(DataError, ["integer tensor of labels 0..2"], evaluate_labelled_elbo, model, x, None)


def test_m2_encodes_at_the_classifier_s_most_probable_class_without_labels():
    model, x = small(SSVAE), binary(4, D)
    likely = model.classify(x).probs.argmax(-1)
    torch.testing.assert_close(model.encode(x).mean, model.encode(x, likely).mean, rtol=0, atol=0)


@pytest.mark.parametrize(
    "y, words",
    [
        (torch.tensor([0.0, 1.0, 2.0]), ["integer tensor", "0..2"]),
        (torch.tensor([True, False, True]), ["integer tensor"]),
        ([0, 1, 2], ["integer tensor"]),
        (torch.tensor([0, 3, 1]), ["label 3", "0..2"]),
        (torch.tensor([0, -1, 1]), ["label -1", "0..2"]),
        (torch.tensor([0, 1]), ["shape (2,)", "3 images"]),
    ],
)
def test_check_labels_refuses_in_one_line(y, words):
    for model in (small(CVAE), small(SSVAE)):
        raises_one_line(DataError, words, model.check_labels, y, 3)
        raises_one_line(DataError, words, evaluate_labelled, model, binary(3, D), y, ks=(1,))
    raises_one_line(DataError, words, accuracy, small(SSVAE), binary(3, D), y)


# ----------------------------------------------------------------------------------------------------------------
# build_model
def test_build_model_builds_the_kind_named():
    assert type(build_model(ModelConfig(latent_dim=L, hidden_dims=(8,)), D, num_classes=4)) is VAE
    cvae = build_model(ModelConfig(kind="cvae", latent_dim=L, hidden_dims=(8,)), D, num_classes=4)
    m2 = build_model(ModelConfig(kind="m2", latent_dim=L, hidden_dims=(8,), num_classes=4), D)
    assert type(cvae) is CVAE and type(m2) is SSVAE and cvae.num_classes == m2.num_classes == 4
    assert m2.enumerates and not cvae.enumerates and m2.latent_sites == ("z", "z_labelled")


def test_build_model_refuses_disagreeing_or_missing_class_counts_in_one_line():
    config = ModelConfig(kind="m2", latent_dim=L, hidden_dims=(8,), num_classes=4)
    raises_one_line(ConfigError, ["num_classes=4", "5 classes", "drop num_classes"], build_model, config, D, None, 5)
    config = ModelConfig(kind="cvae", latent_dim=L, hidden_dims=(8,))
    raises_one_line(ConfigError, ["--model cvae", "number of classes"], build_model, config, D)
    raises_one_line(ConfigError, ["kind 'cvae'", "build_model"], SSVAE.from_config, config, D)


def test_m2_config_describes_the_model_and_round_trips():
    model = small(SSVAE, aux_weight=2.5, guide="low_rank", prior="mog:3")
    config = model.config
    assert (config.kind, config.num_classes, config.aux_weight) == ("m2", C, 2.5)
    assert (config.latent_dim, config.hidden_dims, config.guide, config.prior) == (L, (8,), "low_rank", "mog:3")
    again = build_model(config, D)
    assert type(again) is SSVAE and again.config == config and again.aux_weight == 2.5
    ours, theirs = model.state_dict(), again.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert any(k.startswith("classifier.") for k in ours)
    assert small(CVAE).config.kind == "cvae" and small(CVAE).config.aux_weight is None


# ----------------------------------------------------------------------------------------------------------------
# Config errors
@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: RunConfig(data=DataConfig(labelled=40)), ["--labelled", "--model m2", "drop --labelled"]),
        (
            lambda: RunConfig(model=ModelConfig(kind="m2"), train=TrainConfig(objective="iwae:5")),
            ["--model m2", "'iwae:5'", "--objective trace"],
        ),
        (
            lambda: RunConfig(model=ModelConfig(kind="m2"), train=TrainConfig(objective="meanfield")),
            ["--model m2", "'meanfield'", "--objective trace"],
        ),
        (lambda: ModelConfig(kind="cvae", prior="vamp:5"), ["VampPrior", "--model cvae", "--prior standard"]),
        (lambda: ModelConfig(kind="m2", prior="vamp:5"), ["VampPrior", "--model m2", "--prior standard"]),
        (
            lambda: RunConfig(model=ModelConfig(kind="cvae"), train=TrainConfig(labelled_batch=8)),
            ["--labelled-batch", "--model cvae", "--model m2"],
        ),
        (lambda: RunConfig(train=TrainConfig(labelled_batch=8)), ["--labelled-batch", "--model vae", "--model m2"]),
        (lambda: ModelConfig(kind="cvae", aux_weight=1.0), ["aux_weight", "--model cvae", "drop --aux-weight"]),
        (lambda: ModelConfig(aux_weight=1.0), ["aux_weight", "--model vae", "drop --aux-weight"]),
        (lambda: ModelConfig(num_classes=3), ["num_classes", "drop it"]),
        (
            lambda: RunConfig(model=ModelConfig(kind="cvae"), train=TrainConfig(kl_schedule="free_bits:0.1")),
            ["free_bits", "--model cvae", "linear:STEPS"],
        ),
        (
            lambda: RunConfig(model=ModelConfig(kind="m2"), train=TrainConfig(kl_schedule="free_bits:0.1")),
            ["free_bits", "--model m2", "linear:STEPS"],
        ),
    ],
)
def test_config_refuses_what_a_model_with_labels_cannot_do_in_one_line(make, words):
    raises_one_line(ConfigError, words, make)


def test_config_accepts_the_options_of_a_model_with_labels():
    config = RunConfig(
        data=DataConfig(labelled=40),
        model=ModelConfig(kind="m2", aux_weight=3.0, prior="mog:4"),
        train=TrainConfig(objective="trace:2", labelled_batch=8, kl_schedule="linear:10"),
    )
    assert config.model.kind == "m2" and config.train.labelled_batch == 8
    RunConfig(data=DataConfig(labelled=40), model=ModelConfig(kind="cvae"))


# ----------------------------------------------------------------------------------------------------------------
# Importance-sampled log p(x) (M2) and log p(x | y) (CVAE) against a linear-Gaussian model in closed form
SIGMA = 0.5  # the likelihood "gaussian:0.5": a fixed σ


class LinearModel:
    """z ~ N(0, I), x | z, y ~ N(W z + V onehot(y) + b, σ² I), so x | y ~ N(b + V_y, W Wᵀ + σ² I) and the posterior
    p(z | x, y) is N(G (x − b − V_y), Σ) with Σ = (I + WᵀW / σ²)⁻¹ and G = Σ Wᵀ / σ² (numpy, float64)."""

    def __init__(self, seed, dim=D, orthogonal=False):
        rng = np.random.default_rng(seed)
        w = rng.normal(size=(dim, L))
        if orthogonal:  # orthogonal columns: a diagonal Σ, so the diagonal guide can be the exact posterior
            w = np.linalg.qr(w)[0] * np.array([1.5, 0.7])
        self.w, self.v, self.b, self.dim = w, 0.4 * rng.normal(size=(dim, C)), rng.normal(size=dim), dim
        self.cov_x = w @ w.T + SIGMA**2 * np.eye(dim)
        self.post_cov = np.linalg.inv(np.eye(L) + w.T @ w / SIGMA**2)
        self.gain = self.post_cov @ w.T / SIGMA**2  # (L, D)
        self.rng = rng

    def draw(self, n):
        y = self.rng.integers(C, size=n)
        z = self.rng.normal(size=(n, L))
        x = z @ self.w.T + self.v[:, y].T + self.b + SIGMA * self.rng.normal(size=(n, self.dim))
        return torch.from_numpy(x), torch.from_numpy(y)

    def log_px_given_y(self, x, y):
        rows = zip(x, y, strict=True)
        return np.array([stats.multivariate_normal(self.b + self.v[:, c], self.cov_x).logpdf(xi) for xi, c in rows])

    def log_px(self, x):
        per_class = np.stack([stats.multivariate_normal(self.b + self.v[:, c], self.cov_x).logpdf(x) for c in range(C)])
        return np.logaddexp.reduce(per_class - math.log(C), axis=0).reshape(-1)

    def install(self, model, shift=0.0, widen=1.0):
        """Make ``model``'s decoder this linear map and its encoder the linear q(z | x, y) =
        N(G (x − b − V_y) + shift·sd, diag(widen · sd)²), sd the posterior's marginal standard deviations."""
        sd = np.sqrt(np.diag(self.post_cov))
        decoder, encoder = nn.Linear(L + C, self.dim), nn.Linear(self.dim + C, 2 * L)
        weight = np.zeros((2 * L, self.dim + C))
        weight[:L, : self.dim] = self.gain
        weight[:L, self.dim :] = -self.gain @ (self.b[:, None] + self.v)  # −G (b + V_c) for the one-hot of c
        bias = np.concatenate([shift * sd, np.log(np.expm1(widen * sd - model.family.eps))])  # softplus⁻¹
        with torch.no_grad():
            decoder.weight.copy_(torch.from_numpy(np.concatenate([self.w, self.v], 1)))
            decoder.bias.copy_(torch.from_numpy(self.b))
            encoder.weight.copy_(torch.from_numpy(weight))
            encoder.bias.copy_(torch.from_numpy(bias))
        model.decoder, model.encoder = decoder.double(), encoder.double()
        return sd

    def log_weights(self, x, classes, loc, scale, draws):
        """log w = log N(x; W z + V_c + b, σ²) + log N(z; 0, I) − log q(z) for ``draws`` z from q per (image, class):
        ``(draws, len(classes), B)``."""
        eps = self.rng.normal(size=(draws, *loc.shape))
        z = loc + scale * eps  # (draws, C', B, L)
        means = z @ self.w.T + self.v[:, classes].T[:, None, :] + self.b
        log_lik = stats.norm(means, SIGMA).logpdf(x).sum(-1)
        return log_lik + stats.norm.logpdf(z).sum(-1) - stats.norm(loc, scale).logpdf(z).sum(-1)


def is_standard_error(log_w, k):
    """The standard error of log p̂ = log Σ_c (1/C') (1/k) Σ_j w_jc for k draws per class, by the delta method:
    SE(p̂)/p̂ with Var(p̂) = Σ_c Var(w_c) / (C'² k); ``log_w``: ``(draws, C', B)``, many draws, so the variances are
    accurate. Per image ``(B,)``. (Its bias, −SE²/2, is negligible beside the 5 SE allowed.)"""
    shift = log_w.max(axis=(0, 1))
    w = np.exp(log_w - shift)
    mean = w.mean(0).mean(0)  # p̂'s expectation, shifted
    var = w.var(0, ddof=1).sum(0) / (w.shape[1] ** 2 * k)
    return np.sqrt(var) / mean


def linear_models(model_cls, seed, **kwargs):
    model = small(model_cls, likelihood=f"gaussian:{SIGMA}").double()
    truth = LinearModel(seed, **kwargs)
    return model, truth


@pytest.mark.parametrize("model_cls", [SSVAE, CVAE])
def test_importance_sampled_log_likelihood_matches_the_gaussian_mixture(float64, model_cls):
    """A guide off the posterior (shifted by 0.4 sd, 1.3× wider): each image's K = 2000 estimate lies within 5 of its
    standard errors of the exact value; the standard error comes from 20000 independent draws of the same weights."""
    model, truth = linear_models(model_cls, seed=1)
    sd = truth.install(model, shift=0.4, widen=1.3)
    x, y = truth.draw(4)
    k = 2000
    if model_cls is SSVAE:
        exact, classes = truth.log_px(x.numpy()), np.arange(C)
    else:
        exact, classes = truth.log_px_given_y(x.numpy(), y.numpy()), None
    for i in range(x.shape[0]):
        xi, yi = x[i : i + 1], y[i : i + 1]
        labels = None if model_cls is SSVAE else yi
        estimate = evaluate_labelled(model, xi, labels, ks=(k,), seed=i).bounds[0].log_px.mean
        used = classes if classes is not None else yi.numpy()
        loc = truth.gain @ (xi.numpy()[0][:, None] - truth.b[:, None] - truth.v[:, used]) + 0.4 * sd[:, None]
        log_w = truth.log_weights(xi.numpy()[0], used, loc.T[:, None, :], 1.3 * sd, 20000)  # (draws, C', 1, ...)
        se = is_standard_error(log_w.reshape(20000, len(used), 1), k)[0]
        assert se < 0.02  # a sharp test: the guide is close enough to the posterior
        assert abs(estimate - exact[i]) < 5 * se, (i, estimate, exact[i], se)


@pytest.mark.parametrize("model_cls", [SSVAE, CVAE])
@pytest.mark.parametrize("chunk_size", [5, 4096])
def test_exact_posterior_guide_gives_the_exact_log_likelihood_at_any_chunking(float64, model_cls, chunk_size):
    """With q(z | x, y) = p(z | x, y) every weight is p(x | y): every bound is exact whatever the draws, so chunks of
    5 particles × images × classes and one chunk of all give the same numbers (to float64 rounding)."""
    model, truth = linear_models(model_cls, seed=2, orthogonal=True)
    truth.install(model)
    x, y = truth.draw(6)
    result = evaluate_labelled(model, x, y, ks=(1, 4), chunk_size=chunk_size)
    exact = truth.log_px(x.numpy()) if model_cls is SSVAE else truth.log_px_given_y(x.numpy(), y.numpy())
    for bound in result.bounds:
        assert bound.log_px.mean == pytest.approx(exact.mean(), abs=1e-9)
        assert bound.log_px.se == pytest.approx(exact.std(ddof=1) / math.sqrt(6), abs=1e-9)
    if model_cls is SSVAE:
        # U(x) = Σ_c q(c | x) [log p(x | c) + log(1/C) − log q(c | x)] exactly, z's part having no gap.
        probs = model.classify(x).probs.detach().numpy()  # (B, C)
        per_class = np.stack([truth.log_px_given_y(x.numpy(), np.full(6, c)) for c in range(C)], 1)
        elbo = (probs * (per_class - math.log(C) - np.log(probs))).sum(1)
        assert result.elbo.mean == pytest.approx(elbo.mean(), abs=1e-9)
        assert result.protocol.target == "log p(x)"
    else:
        elbo = exact
        assert result.protocol.target == "log p(x | y)"
    assert result.elbo.mean == pytest.approx(elbo.mean(), abs=1e-9)
    # The per-epoch single-sample ELBO is the same bound, in batches of its own size.
    per_epoch = evaluate_labelled_elbo(model, x, y, batch_size=4).elbo
    assert per_epoch.elbo.mean == pytest.approx(elbo.mean(), abs=1e-9) and per_epoch.num_images == 6


# ----------------------------------------------------------------------------------------------------------------
# Every registered guide family as q(z | x, y)
@pytest.mark.parametrize("guide", family_names())
@pytest.mark.parametrize("model_cls", [CVAE, SSVAE])
def test_every_guide_family_works_as_q_of_z_given_x_and_y(model_cls, guide):
    model = small(model_cls, guide=guide)
    b = 4
    x, y = binary(b, D), torch.tensor([0, 1, 2, 1])
    q = model.encode(x, y)
    z = q.rsample()
    assert (q.batch_shape, q.event_shape, z.shape) == ((b,), (L,), (b, L))
    assert torch.isfinite(q.log_prob(z)).all() and q.log_prob(z).shape == (b,)
    z.sum().backward()  # reparameterised: the encoder gets a gradient through the sample
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    enumerated = model.encode(x, torch.arange(C)[:, None])  # M2's enumerated y: every class for every image
    z = enumerated.rsample()
    assert (enumerated.batch_shape, z.shape) == ((C, b), (C, b, L))
    log_q = enumerated.log_prob(z)
    assert log_q.shape == (C, b) and torch.isfinite(log_q).all()
    step = TrainStep(model, TrainConfig(lr=1e-3), num_data=20)  # the first step runs with Pyro validation on
    labels = {"y": y} if model_cls is CVAE else {"labelled": LabelledPart(x[:2], y[:2], 8, torch.tensor([3, 5]))}
    loss = step.step(x, torch.arange(b), **labels)
    assert math.isfinite(loss)


@pytest.mark.parametrize("guide", family_names())
@pytest.mark.parametrize("model_cls, objective", [(CVAE, "trace:2"), (CVAE, "iwae:3"), (SSVAE, "trace:2")])
def test_every_guide_family_trains_with_vectorised_particles(model_cls, objective, guide):
    """Vectorised particles put q(z | x, y) in a particle plate, which expands its batch shape (M2: inside the
    enumerated y); one validated step of every family gives a finite loss."""
    model, x, y = small(model_cls, guide=guide), binary(4, D), torch.tensor([0, 1, 2, 1])
    step = TrainStep(model, TrainConfig(objective=objective), num_data=20)
    labels = {"y": y} if model_cls is CVAE else {"labelled": LabelledPart(x[:2], y[:2], 8, torch.tensor([3, 5]))}
    assert math.isfinite(step.step(x, torch.arange(4), **labels))


def test_m2_vectorised_particles_average_the_textbook_bound(float64):
    """``trace:P`` draws P independent z per (class, image): the loss is the mean over particles of −Σ_b U(x_b).
    Under the particle plate (dim −2) the enumerated y is ``(C, 1, 1)``, and q's base draws ``(P, C·B)``."""
    model, x, particles = small(SSVAE).double(), binary(5, D).double(), 3
    pyro.set_rng_seed(6)
    loss = make_objective("trace", particles, enumerate=True).loss(model.model, model.guide, x)
    pyro.set_rng_seed(6)
    with torch.no_grad():
        base = model.encode(x, torch.arange(C)[:, None, None]).base  # batch (C·1·B,)
        z = base.expand((particles, C * 5)).rsample().reshape(particles, C, 5, L)
        expected = -torch.stack([unlabelled_bound(model, x, z[p]).sum() for p in range(particles)]).mean()
    assert loss == pytest.approx(expected.item(), rel=1e-12)


IMAGE = (1, 8, 8)  # the smallest image the conv network takes


def conv_model(cls):
    pyro.set_rng_seed(0)
    kwargs = {"aux_weight": 0.7} if cls is SSVAE else {}
    return cls(64, C, latent_dim=L, network="conv", image_shape=IMAGE, conv_channels=(4, 4), **kwargs)


@pytest.mark.parametrize("model_cls", [CVAE, SSVAE])
def test_the_conv_network_reads_the_label_as_constant_channels(model_cls):
    """For an image network the encoder's input is ``(1 + C, H, W)``: the image, then one constant plane y_k per
    class; a step trains (M2: with y enumerated through the convolutions) and samples come out by class."""
    model, x, y = conv_model(model_cls), binary(5, 64), torch.tensor([0, 1, 2, 0, 1])
    planes = model.conditional_input(x, F.one_hot(y, C).float()).reshape(5, 1 + C, 8, 8)
    torch.testing.assert_close(planes[:, 0], x.reshape(5, 8, 8), rtol=0, atol=0)
    torch.testing.assert_close(planes[:, 1:], F.one_hot(y, C).float()[:, :, None, None].expand(5, C, 8, 8))
    assert model.encode(x, torch.arange(C)[:, None]).rsample().shape == (C, 5, L)
    step = TrainStep(model, TrainConfig(), num_data=20)
    labels = {"y": y} if model_cls is CVAE else {"labelled": LabelledPart(x[:2], y[:2], 8, torch.tensor([3, 5]))}
    assert math.isfinite(step.step(x, torch.arange(5), **labels))
    assert model.sample(4, label=2).shape == (4, 64)
    again = build_model(model.config, 64, IMAGE)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


GAUSSIAN_FAMILIES = [name for name in family_names() if not isinstance(make_family(name, L), FlowFamily)]


@pytest.mark.parametrize("guide", GAUSSIAN_FAMILIES)
def test_enumerated_labels_give_each_class_its_own_q(guide):
    """Row c of q(z | x, y = arange(C)[:, None]) is q(z | x, c) of the images encoded with the labels all c (scored at
    any value: the Gaussian families have a density everywhere; a flow scores only its own samples)."""
    model, x = small(SSVAE, guide=guide), binary(4, D)
    enumerated = model.encode(x, torch.arange(C)[:, None])
    value = torch.randn(C, 4, L)
    for c in range(C):
        alone = model.encode(x, torch.full((4,), c))
        torch.testing.assert_close(enumerated.log_prob(value)[c], alone.log_prob(value[c]))
        torch.testing.assert_close(enumerated.mean[c], alone.mean)


# ----------------------------------------------------------------------------------------------------------------
# Accuracy
def test_evaluation_accuracy_is_the_classifier_s_at_any_chunking():
    """Labels chosen so that q(y | x)'s most probable class is right for exactly 6 of the 10 images."""
    model, x = small(SSVAE), binary(10, D)
    likely = model.classify(x).probs.argmax(-1)
    y = torch.where(torch.arange(10) < 6, likely, (likely + 1) % C)
    direct = accuracy(model, x, y, batch_size=3)
    # mean_se: the sample standard deviation (ddof 1) over √n, for six hits and four misses √(0.24 · 10/9 / 10)
    assert direct.mean == pytest.approx(0.6) and direct.se == pytest.approx(math.sqrt(0.6 * 0.4 / 9))
    for chunk_size in (3, 4096):
        assert evaluate_labelled(model, x, y, ks=(1, 2), chunk_size=chunk_size).accuracy == direct
    assert evaluate_labelled_elbo(model, x, y, batch_size=4).accuracy == direct
    assert evaluate_labelled(model, x, None, ks=(1,)).accuracy is None
    assert evaluate_labelled_elbo(model, x, None).accuracy is None
    cvae = small(CVAE)
    assert evaluate_labelled(cvae, x, y, ks=(1,)).accuracy is None
    assert evaluate_labelled_elbo(cvae, x, y).accuracy is None


# ----------------------------------------------------------------------------------------------------------------
# Training: KL weights on both latent sites, fit end to end, bit-exact resume
def test_kl_schedule_weights_both_latent_sites_of_m2_and_nothing_else():
    model = small(SSVAE)
    step = TrainStep(model, TrainConfig(kl_schedule="constant:0.25"), num_data=20)
    x, part = binary(4, D), LabelledPart(binary(2, D, seed=3), torch.tensor([0, 2]), 8, torch.tensor([1, 6]))
    args, kwargs = (x, 20, torch.arange(4)), {"labelled": part}
    guide = poutine.trace(step.svi.guide).get_trace(*args, **kwargs)
    trace = poutine.trace(poutine.replay(step.svi.model, trace=guide)).get_trace(*args, **kwargs)
    beta, unlabelled, labelled = 0.25, 20 / 4, 8 / 2  # β and each plate's N / B
    expected = {"z": beta * unlabelled, "z_labelled": beta * labelled, "x": unlabelled, "x_labelled": labelled,
                "y_labelled": labelled, "y_aux_labelled": model.aux_weight * labelled, "y": unlabelled}  # fmt: skip
    for name, scale in expected.items():
        assert float(trace.nodes[name]["scale"]) == pytest.approx(scale), name
    for name in ("z", "z_labelled", "y"):
        assert float(guide.nodes[name]["scale"]) == pytest.approx(expected[name]), name


FIT_TRAIN, FIT_TEST, FIT_BATCH, FIT_LABELLED = 300, 64, 64, 40


@pytest.fixture(scope="module")
def labelled_data():
    return load_dataset(DataConfig(n_train=FIT_TRAIN, n_test=FIT_TEST))


def fit_config(kind, **train):
    labelled = FIT_LABELLED if kind == "m2" else None
    defaults = {"epochs": 1, "batch_size": FIT_BATCH, "progress": False, "threads": 1}
    return RunConfig(
        data=DataConfig(n_train=FIT_TRAIN, n_test=FIT_TEST, labelled=labelled),
        model=ModelConfig(kind=kind, latent_dim=2, hidden_dims=(32, 16), num_classes=10),
        train=TrainConfig(**{**defaults, **train}),
    )


def new_model(config, data):
    pyro.set_rng_seed(0)
    return build_model(config.model, data.input_dim, data.image_shape, num_classes(data))


@pytest.mark.parametrize("kind", ["cvae", "m2"])
def test_fit_trains_a_model_with_labels_and_records_them(labelled_data, tmp_path, kind):
    config = fit_config(kind)
    model = new_model(config, labelled_data)
    result = fit(model, labelled_data, config, out_dir=tmp_path / "run")
    assert result.steps > 0 and all(math.isfinite(loss) for loss in result.losses)
    (record,) = result.epochs
    tc, dc = config.train, config.data
    y_train = labelled_data.y_train
    index = torch.arange(FIT_TRAIN) if kind == "cvae" else select_labelled(y_train, FIT_LABELLED, 10, tc.seed)
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["labelled"] == {"n": index.numel(), "sha256": labels_fingerprint(labelled_data.y_train, index)}
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    if kind == "m2":
        x_test = binarize_eval(labelled_data.x_test, dc.binarize, tc.seed, dc.threshold)
        assert record.accuracy == accuracy(model, x_test, labelled_data.y_test).mean  # the trained classifier's
        assert metrics["accuracy"] == record.accuracy and model.aux_weight == 0.1 * FIT_TRAIN
    else:
        assert record.accuracy is None and metrics["accuracy"] is None


@pytest.mark.parametrize(
    "kind, change, error, words",
    [
        ("m2", {"labelled": 5}, DataError, ["5", "10 classes"]),
        ("m2", {"labelled": FIT_TRAIN + 1}, DataError, [str(FIT_TRAIN + 1)]),
        ("cvae", {"no_labels": True}, DataError, ["no labels", "--model cvae/m2 need labels"]),
        ("m2", {"classes": 3}, ConfigError, ["10 classes", "built for 3", "build_model"]),
    ],
)
def test_fit_refuses_bad_label_input_in_one_line_before_writing_anything(
    labelled_data, tmp_path, kind, change, error, words
):
    config = fit_config(kind)
    data = labelled_data
    if "labelled" in change:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, labelled=change["labelled"]))
    if "no_labels" in change:
        data = dataclasses.replace(data, y_train=None, y_test=None)
    model = new_model(config, labelled_data)
    if "classes" in change:
        model = build_model(dataclasses.replace(config.model, num_classes=change["classes"]), data.input_dim)
        config = dataclasses.replace(config, model=model.config)
    message = raises_one_line(error, words, fit, model, data, config, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists(), message


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cvae", "m2"])
def test_resume_from_a_mid_epoch_checkpoint_is_bit_exact(labelled_data, tmp_path, kind):
    """Two epochs uninterrupted against a run that crashes inside the second epoch and resumes from the last
    checkpoint (every 2 steps): same losses, parameters and metrics, bit for bit (CPU, one thread)."""
    config = fit_config(kind, epochs=2, checkpoint_every=2)
    reference = new_model(config, labelled_data)
    expected = fit(reference, labelled_data, config, out_dir=tmp_path / "reference")
    steps_per_epoch = expected.epochs[0].step  # steps done by the end of epoch 0
    crash_at = steps_per_epoch + 2  # the 0-based index of the third step of the second epoch
    with pytest.raises(Crash):
        crashing = new_model(config, labelled_data)
        fit(crashing, labelled_data, config, out_dir=tmp_path / "run", callbacks=[CrashAt(crash_at)])
    checkpoint_step = load_checkpoint(tmp_path / "run" / "last.pt")["progress"]["step"]
    assert steps_per_epoch < checkpoint_step < crash_at + 1  # mid-epoch
    model = new_model(config, labelled_data)
    result = fit(model, labelled_data, config, out_dir=tmp_path / "run", resume=True)
    assert result.losses == expected.losses and result.steps == expected.steps
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [r._replace(seconds=0.0) for r in result.epochs] == [r._replace(seconds=0.0) for r in expected.epochs]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("guide", ["mvn_diag", "planar"])
def test_m2_vectorised_particles_on_cuda(guide):
    """The expanded q keeps its layout (an index made on the CPU) on the device of the draws."""
    model = small(SSVAE, guide=guide).cuda()
    x, y = binary(4, D).cuda(), torch.tensor([0, 1, 2, 1], device="cuda")
    step = TrainStep(model, TrainConfig(objective="trace:2"), num_data=20)
    labelled = LabelledPart(x[:2], y[:2], 8, torch.tensor([3, 5], device="cuda"))
    assert math.isfinite(step.step(x, torch.arange(4, device="cuda"), labelled=labelled))
    q = model.encode(x, torch.arange(C, device="cuda")[:, None]).expand((C, 2, 4))
    z = q.rsample()
    assert z.device.type == "cuda" and torch.isfinite(q.log_prob(z)).all()


def test_resume_with_other_labels_is_refused_and_a_config_without_num_classes_is_completed(labelled_data, tmp_path):
    """A resumed M2 run must train on the labels it started with: one changed label of a labelled image is named,
    before anything is trained; and fit takes a config whose num_classes is unset (the model's, from the data)."""
    config = fit_config("m2")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=None))
    out = tmp_path / "run"
    fit(new_model(config, labelled_data), labelled_data, config, out_dir=out)
    written = json.loads((out / "config.json").read_text())
    assert written["config"]["model"]["num_classes"] == 10
    index = select_labelled(labelled_data.y_train, FIT_LABELLED, 10, config.train.seed)
    y = labelled_data.y_train.clone()
    y[index[0]] = (y[index[0]] + 1) % 10
    changed = dataclasses.replace(labelled_data, y_train=y)
    more = config.replace(train={"epochs": 2})
    with pytest.raises(ConfigError, match="labelled images or their labels") as info:
        fit(new_model(more, changed), changed, more, out_dir=out, resume=True)
    assert "\n" not in str(info.value)
    fit(new_model(more, labelled_data), labelled_data, more, out_dir=out, resume=True)  # the same labels resume


@pytest.mark.parametrize("model_cls", [CVAE, SSVAE])
def test_compile_falls_back_to_the_eager_step_with_one_line(model_cls, caplog):
    """The traced step takes (x, index) only; a model with labels trains eagerly, saying so once, and its steps are
    those of an eager TrainStep (same seed, same losses)."""
    x, y = binary(8, D), torch.randint(0, C, (8,), generator=torch.Generator().manual_seed(1))
    losses = {}
    for compile_ in (True, False):
        pyro.set_rng_seed(0)
        model = small(model_cls)
        step = TrainStep(model, TrainConfig(compile=compile_, kl_schedule=None), num_data=40)
        with caplog.at_level(logging.INFO, logger="pyro_vae.compile"):
            losses[compile_] = [step.step(x, torch.arange(8), y=y) for _ in range(3)]
        assert step.compiled is None
    assert losses[True] == losses[False]
    falls_back = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(falls_back) == 1 and f"--model {model_cls.kind} passes labels" in falls_back[0]


def test_the_non_finite_guard_covers_the_mixed_m2_step():
    """After one step of size 1e30 every forward pass of M2 overflows: the guard refuses the next mixed step (raise),
    or skips it and returns NaN (skip), and the parameters stay as they were."""
    x, x_l, y_l = binary(8, D), binary(4, D, seed=3), torch.tensor([0, 1, 2, 0])
    part = LabelledPart(x_l, y_l, 20, torch.arange(4))
    for policy in ("raise", "skip"):
        model = small(SSVAE)
        step = TrainStep(model, TrainConfig(lr=1e30, kl_schedule=None, on_nonfinite=policy), num_data=40)
        step.step(x, torch.arange(8), labelled=part)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with warnings.catch_warnings():  # Pyro's own "Encountered NaN: loss" warning, before the guard speaks
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            if policy == "raise":
                with pytest.raises(NonFiniteLossError, match="at optimiser step 2"):
                    step.step(x, torch.arange(8), labelled=part)
            else:
                assert math.isnan(step.step(x, torch.arange(8), labelled=part)) and step.skipped == 1
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
