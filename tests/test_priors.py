"""The prior registry's contract, parametrised over every registered prior: shapes, log_prob against an independent
float64 reference, samples against log_prob (tolerances from standard errors), gradients, the optimiser, training
from the command line, evaluation, sampling, bit-exact resume, and bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from scipy import stats
from scipy.special import logsumexp

from pyro_vae import cli
from pyro_vae.config import CLOSED_FORM_KL_PRIORS, DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.errors import ConfigError
from pyro_vae.guides import family_names
from pyro_vae.importance import log_weights, particle_traces
from pyro_vae.model import VAE
from pyro_vae.priors import FlowPrior, MixturePrior, Prior, UniformMixture, VampPrior, make_prior, prior_names
from pyro_vae.priors.vamp import SCORES_ANY_Z
from pyro_vae.step import TrainStep
from pyro_vae.train import fit

D, L = 6, 3
SPECS = {"standard": "standard", "mog": "mog:3", "vamp": "vamp:4", "flow": "flow:2"}
LEARNED = [name for name in prior_names() if name not in CLOSED_FORM_KL_PRIORS]


def prior_of(name, latent_dim=L, dtype=torch.float32, **vae_options):
    """A prior built the way users get one: inside a tiny VAE (which attaches the encoder the VampPrior needs)."""
    pyro.set_rng_seed(0)
    vae = VAE(D, latent_dim, hidden_dims=(8,), prior=SPECS[name], **vae_options).to(dtype)
    if name == "vamp":
        with torch.no_grad():  # away from the constructor's uniform [0, 1) so that the components differ
            vae.prior.pseudo_inputs.normal_(generator=torch.Generator().manual_seed(1))
    return vae.prior


def test_every_registered_prior_is_covered_here():
    assert prior_names() == sorted(SPECS) == sorted(REFERENCES)


def test_closed_form_kl_priors_are_the_standard_normal_ones():
    # RunConfig's meanfield rule names them (config may not import the registry); the classes say it too.
    assert sorted(CLOSED_FORM_KL_PRIORS) == [n for n in prior_names() if make_prior(n, 2).standard_normal]


@pytest.mark.parametrize("name", prior_names())
def test_shapes_and_vectorised_particles(name):
    prior = prior_of(name)
    z = torch.randn(5, 7, L, generator=torch.Generator().manual_seed(2))  # (P, B, L)
    p = prior(7, z)
    assert p.batch_shape == (7,) and p.event_shape == (L,)
    log_p = p.log_prob(z)
    assert log_p.shape == (5, 7)
    for particle in range(5):  # each particle scores as it would alone
        torch.testing.assert_close(log_p[particle], p.log_prob(z[particle]), rtol=0, atol=1e-6)
    assert prior.sample_codes(11, z).shape == (11, L)


# ------------------------------------------------------------------------------------------------------------------
# log_prob against independent float64 references


def standard_reference(prior, z):
    return stats.norm.logpdf(z).sum(-1)


def mog_reference(prior, z):
    loc, scale = prior.loc.detach().numpy(), prior.scale.detach().numpy()
    log_w = prior.logits.detach().numpy() - logsumexp(prior.logits.detach().numpy())
    per_component = [
        log_w[k] + stats.multivariate_normal(loc[k], np.diag(scale[k] ** 2)).logpdf(z) for k in range(len(log_w))
    ]
    return logsumexp(np.stack(per_component, -1), axis=-1)


def vamp_reference(prior, z):
    q = prior._encode(prior.pseudo_inputs)  # the mvn_diag family: a MultivariateNormal per pseudo-input
    loc, cov = q.loc.detach().numpy(), q.covariance_matrix.detach().numpy()
    per_component = [stats.multivariate_normal(loc[k], cov[k]).logpdf(z) for k in range(loc.shape[0])]
    return logsumexp(np.stack(per_component, -1), axis=-1) - math.log(loc.shape[0])


def flow_reference(prior, z):
    """Change of variables with the inverse map u = f(z) (z back to the base) and a central finite-difference
    Jacobian: log p(z) = Σ_d log N(u_d; 0, 1) + log |det ∂u/∂z|. With h = 1e-5 in float64 the truncation error is
    O(h²) ≈ 1e-10 and the rounding error O(ε/h) ≈ 1e-11, far inside the 1e-7 tolerance."""
    transforms = prior(1, torch.zeros(1, L, dtype=torch.float64)).transforms

    def inverse(v):
        u = torch.as_tensor(v, dtype=torch.float64).clone()
        with torch.no_grad():
            for t in reversed(transforms):
                u = t.inv(u)
        return u.numpy()

    out, h = [], 1e-5
    for point in z:
        jacobian = np.stack(
            [(inverse(point + h * e) - inverse(point - h * e)) / (2 * h) for e in np.eye(len(point))], axis=1
        )
        out.append(stats.norm.logpdf(inverse(point)).sum() + np.linalg.slogdet(jacobian)[1])
    return np.array(out)


REFERENCES = {"standard": standard_reference, "mog": mog_reference, "vamp": vamp_reference, "flow": flow_reference}


@pytest.mark.parametrize("name", prior_names())
def test_log_prob_against_an_independent_reference_in_float64(name):
    prior = prior_of(name, dtype=torch.float64)
    if name == "mog":  # away from the initial unit scales and equal weights, which would hide a mix-up
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in (prior.loc, prior.raw_scale, prior.logits):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    z = 1.5 * torch.randn(9, L, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        ours = prior(9, z).log_prob(z).numpy()
    np.testing.assert_allclose(ours, REFERENCES[name](prior, z.numpy()), rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------------
# samples against log_prob


@pytest.mark.parametrize("name", prior_names())
def test_samples_have_the_moments_of_the_density(name):
    """In L = 2, the density's mass, means and second moments by quadrature on a grid against the sample moments of
    n draws from ``sample_codes`` (what ``vae.sample`` and the figures use).

    Tolerance: the sample mean of n i.i.d. values of f(z) has standard error SE = sd(f)/√n (sd estimated from the
    draws); we allow 4 SE per moment (two-sided false-alarm rate 6e-5 per comparison, four per prior). The
    quadrature (midpoint rule, h = 0.025 on [-10, 10]², for densities with unit-order scales) is exact to far below
    that (about 1e-5); its mass must be 1 to within 1e-3, which also checks that log_prob is normalised.
    """
    prior = prior_of(name, latent_dim=2)
    n = 20_000
    draws = prior.sample_codes(n, torch.zeros(1), torch.Generator().manual_seed(5)).double().numpy()  # (n, 2)
    h = 0.025
    axis = torch.arange(-10 + h / 2, 10, h)
    grid = torch.cartesian_prod(axis, axis)  # (G, 2)
    with torch.no_grad():
        density = prior(grid.shape[0], grid).log_prob(grid).double().exp().numpy() * h * h  # mass per cell
    grid = grid.double().numpy()
    assert abs(density.sum() - 1) < 1e-3
    for f in (lambda v: v, lambda v: v**2):
        exact = (f(grid) * density[:, None]).sum(0)
        values = f(draws)
        se = values.std(0, ddof=1) / math.sqrt(n)
        assert np.all(np.abs(values.mean(0) - exact) < 4 * se), (values.mean(0), exact, se)


def test_sample_codes_with_a_generator_are_reproducible_and_leave_the_global_stream_alone():
    for name in prior_names():
        prior = prior_of(name)
        state = torch.get_rng_state()
        a = prior.sample_codes(6, torch.zeros(1), torch.Generator().manual_seed(7))
        b = prior.sample_codes(6, torch.zeros(1), torch.Generator().manual_seed(7))
        assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state), name


# ------------------------------------------------------------------------------------------------------------------
# parameters: gradients, the model's param sites, the optimiser, initialisation


@pytest.mark.parametrize("name", prior_names())
def test_gradients_reach_every_prior_parameter(name):
    prior = prior_of(name)
    params = dict(prior.named_parameters())
    if name == "standard":
        assert params == {}  # N(0, I) has nothing to learn
        return
    z = torch.randn(16, L, generator=torch.Generator().manual_seed(8))
    (-prior(16, z).log_prob(z).sum()).backward()
    for key, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", LEARNED)
def test_prior_parameters_are_param_sites_of_the_model_and_the_optimiser_steps_them(name):
    pyro.set_rng_seed(0)
    vae = VAE(D, L, hidden_dims=(8,), prior=SPECS[name])
    x = torch.rand(8, D, generator=torch.Generator().manual_seed(9)).round()
    sites = {n for n, s in poutine.trace(vae.model).get_trace(x).nodes.items() if s["type"] == "param"}
    expected = {f"prior.{key}" for key, _ in vae.prior.named_parameters()}
    assert expected and expected <= sites
    before = {key: p.detach().clone() for key, p in vae.prior.named_parameters()}
    TrainStep(vae, TrainConfig(lr=1e-2, kl_schedule=None), num_data=8).step(x)
    for key, p in vae.prior.named_parameters():
        assert not torch.equal(p, before[key]), key


@pytest.mark.parametrize("name", prior_names())
def test_importance_weights_and_samples_use_the_prior(name):
    """IS log p(x) (evaluation, IWAE) takes log p(z) from the model's trace at the guide's particles, and
    ``vae.sample`` decodes codes drawn by the prior."""
    pyro.set_rng_seed(0)
    vae = VAE(D, L, hidden_dims=(8,), prior=SPECS[name])
    x = torch.rand(4, D, generator=torch.Generator().manual_seed(12)).round()
    model_trace, guide_trace = particle_traces(vae.model, vae.guide, 5, (x,))
    z = guide_trace.nodes["z"]["value"]  # (5, 4, L)
    with torch.no_grad():
        expected = vae.prior(4, x).log_prob(z)
    torch.testing.assert_close(log_weights(model_trace, guide_trace, 5).log_prior.detach(), expected, rtol=0, atol=0)
    codes = vae.prior.sample_codes(3, x, torch.Generator().manual_seed(13))
    with torch.no_grad():
        decoded = vae.likelihood.mean(vae.decoder(codes))
    assert torch.equal(vae.sample(3, generator=torch.Generator().manual_seed(13)), decoded)


def test_the_prior_does_not_change_the_networks_initial_weights():
    # Priors draw from a private generator, so compare --vary prior=... starts every run from the same networks.
    def networks(spec):
        pyro.set_rng_seed(0)
        vae = VAE(D, L, hidden_dims=(8,), prior=spec)
        return {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder", "decoder"))}

    reference = networks("standard")
    for spec in SPECS.values():
        ours = networks(spec)
        assert all(torch.equal(ours[k], reference[k]) for k in reference), spec


@pytest.mark.parametrize("name", LEARNED)
def test_initialise_depends_only_on_the_generator(name):
    x = torch.rand(20, D, generator=torch.Generator().manual_seed(10))

    def initialised(seed):
        prior = prior_of(name)
        prior.initialise(x, torch.Generator().manual_seed(seed))
        return {k: v.clone() for k, v in prior.state_dict().items()}

    a, b, c = initialised(1), initialised(1), initialised(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_vamp_pseudo_inputs_start_at_distinct_training_images():
    prior = prior_of("vamp")
    x = torch.rand(20, D, generator=torch.Generator().manual_seed(11))
    prior.initialise(x, torch.Generator().manual_seed(0))
    rows = [int(torch.nonzero((x == u).all(-1)).squeeze()) for u in prior.pseudo_inputs.detach()]
    assert len(set(rows)) == prior.num_components == 4


# ------------------------------------------------------------------------------------------------------------------
# bad input in Python


def test_vamp_refuses_pseudo_inputs_of_the_wrong_size_and_too_few_images():
    prior = prior_of("vamp")
    with pytest.raises(ConfigError, match=r"saved pseudo-inputs have shape \(4, 5\) but this VampPrior has \(4, 6\)"):
        prior.load_state_dict({"pseudo_inputs": torch.zeros(4, 5)})
    with pytest.raises(ConfigError, match="pseudo-inputs have 6 values each but the training images have 5"):
        prior.initialise(torch.rand(10, 5), torch.Generator())
    with pytest.raises(ConfigError, match=r"vamp:4 starts its 4 pseudo-inputs .* only 3; use vamp:3 or fewer"):
        prior.initialise(torch.rand(3, D), torch.Generator())
    with pytest.raises(RuntimeError, match="build it inside a VAE"):
        VampPrior(L)(2, torch.zeros(2, L))


@pytest.mark.parametrize("family", family_names())
def test_vamp_with_every_guide_family_scores_particles_or_refuses_in_one_line(family):
    pyro.set_rng_seed(0)
    vae = VAE(D, L, hidden_dims=(8,), guide=family, prior="vamp:3")
    x = torch.rand(4, D, generator=torch.Generator().manual_seed(14)).round()
    if family not in SCORES_ANY_Z:
        with pytest.raises(ConfigError, match="needs q\\(z \\| x\\) at any z.*scores only its own samples") as info:
            vae.model(x)
        assert "\n" not in str(info.value)
        return
    terms = log_weights(*particle_traces(vae.model, vae.guide, 5, (x,)), 5)  # z: (5, 4, L) against K = 3
    assert terms.log_prior.shape == (5, 4) and torch.isfinite(terms.log_prior).all()
    assert vae.sample(7).shape == (7, D)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("mogg", ["unknown prior 'mogg'", "did you mean 'mog'?"]),
        ("mog:0", ["in prior 'mog:0', num_components must be an integer >= 1"]),
        ("vamp:x", ["in prior 'vamp:x', num_components must be an integer >= 1"]),
        ("standard:3", ["prior 'standard' takes no ':K' option"]),
        ("flow:-1", ["num_flows must be an integer >= 1"]),
    ],
)
def test_make_prior_refuses_bad_specs(spec, words):
    with pytest.raises(ConfigError) as info:
        make_prior(spec, L)
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words)


@pytest.mark.parametrize("objective", ["meanfield", "meanfield:2"])
@pytest.mark.parametrize("prior", LEARNED)
def test_meanfield_with_a_learned_prior_is_refused_by_the_config(objective, prior):
    with pytest.raises(ConfigError, match="meanfield objective needs a closed-form KL.*use --objective trace"):
        RunConfig(model=ModelConfig(prior=prior), train=TrainConfig(objective=objective))
    RunConfig(model=ModelConfig(prior="standard"), train=TrainConfig(objective=objective))  # the rule is that narrow


@pytest.mark.parametrize("prior", LEARNED)
def test_free_bits_with_a_learned_prior_is_refused_by_the_config(prior):
    with pytest.raises(ConfigError, match="free_bits KL schedule needs the KL of each latent dimension"):
        RunConfig(model=ModelConfig(prior=prior), train=TrainConfig(kl_schedule="free_bits:0.25"))
    RunConfig(model=ModelConfig(prior=prior), train=TrainConfig(kl_schedule="linear:100"))
    RunConfig(model=ModelConfig(prior="standard"), train=TrainConfig(kl_schedule="free_bits:0.25"))


def test_direct_construction_checks_its_size():
    for cls, option in ((MixturePrior, "num_components"), (VampPrior, "num_components"), (FlowPrior, "num_flows")):
        with pytest.raises(ConfigError, match=f"{option} must be a positive integer"):
            cls(L, 0)
    assert isinstance(make_prior("mog", L), Prior) and make_prior("mog", L).num_components == 10


def test_uniform_mixture_checks_its_components():
    with pytest.raises(ValueError, match=r"batch shape \(K,\) and event shape \(L,\)"):
        UniformMixture(torch.distributions.Normal(torch.zeros(3), 1.0), [2])


# ------------------------------------------------------------------------------------------------------------------
# training: fit starts a new run's prior, resume restores it, the command line trains, evaluates and samples

TINY_DATA = DataConfig(n_train=64, n_test=32)
TINY_MODEL = {"latent_dim": 2, "hidden_dims": (16,)}


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset(TINY_DATA)


def tiny_config(prior, **train):
    train = {"epochs": 2, "batch_size": 32, "progress": False, "threads": 1, **train}
    return RunConfig(data=TINY_DATA, model=ModelConfig(prior=prior, **TINY_MODEL), train=TrainConfig(**train))


def tiny_vae(config, data):
    pyro.set_rng_seed(0)
    return VAE.from_config(config.model, data.input_dim)


class PriorAtStart:
    """Records the prior's parameters when training starts (after fit's initialisation or restore)."""

    def on_fit_start(self, loop):
        self.state = {k: v.clone() for k, v in loop.vae.prior.state_dict().items()}

    def __getattr__(self, name):  # the other hooks do nothing
        return lambda *args: None


def test_fit_starts_a_vamp_run_at_training_images(tiny_data):
    config = tiny_config("vamp:5", epochs=1, max_steps=1)
    start = PriorAtStart()
    fit(tiny_vae(config, tiny_data), tiny_data, config, callbacks=[start])
    u = start.state["pseudo_inputs"]
    matches = [torch.nonzero((tiny_data.x_train == row).all(-1)).flatten().tolist() for row in u]
    assert all(len(m) >= 1 for m in matches) and len({m[0] for m in matches}) == 5


@pytest.mark.parametrize("name", LEARNED)
def test_resume_restores_the_prior_bit_exactly(name, tiny_data, tmp_path):
    config = tiny_config(SPECS[name])
    reference = tiny_vae(config, tiny_data)
    fit(reference, tiny_data, config, out_dir=tmp_path / "reference")
    out, first = tmp_path / "run", tiny_vae(config, tiny_data)
    fit(first, tiny_data, tiny_config(SPECS[name], epochs=1), out_dir=out)
    resumed, start = tiny_vae(config, tiny_data), PriorAtStart()
    fit(resumed, tiny_data, config, out_dir=out, resume=True, callbacks=[start])
    checkpoint = first.prior.state_dict()  # not re-initialised on resume: the checkpoint's values
    assert start.state.keys() == checkpoint.keys()
    assert all(torch.equal(start.state[k], checkpoint[k]) for k in checkpoint)
    ours, theirs = resumed.state_dict(), reference.state_dict()
    assert any(k.startswith("prior.") for k in ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def run(capsys, *argv):
    """``pyro-vae ARGV`` in this process: (exit code, stdout, stderr lines)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse exits by itself
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


TINY_CLI = ["--n-train", "64", "--n-test", "32", "--epochs", "1", "--batch-size", "32", "--latent-dim", "2"]
TINY_CLI += ["--hidden-dims", "16", "--threads", "1", "--no-figures"]


@pytest.mark.slow  # a CLI train, evaluate and sample per prior
@pytest.mark.parametrize("name", LEARNED)
def test_every_learned_prior_trains_evaluates_and_samples_from_the_command_line(name, capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--prior", SPECS[name], *TINY_CLI, "--out", out)
    assert code == 0, err
    assert (
        "test ELBO" in stdout
        and json.loads((out / "config.json").read_text())["config"]["model"]["prior"] == (SPECS[name])
    )
    code, stdout, err = run(capsys, "evaluate", out, "--k", "1,100")
    assert code == 0, err
    bounds = {b["k"]: b for b in json.loads((out / "eval.json").read_text())["log_likelihood"]}
    # Evaluation draws 100 particles per image; the k=1 bound is the mean of their 100 log-weights and the k=100
    # bound their log-mean-exp, so Jensen's inequality gives k=100 >= k=1 image by image, with no Monte Carlo slack
    # (tolerance 0 beyond float32 rounding, 1e-4 nats); the standard errors (about 0.5 nats over 32 images) measure
    # the spread between images, not noise in this difference.
    assert bounds[100]["log_px"] >= bounds[1]["log_px"] - 1e-4
    assert math.isfinite(bounds[1]["log_px"]) and bounds[100]["log_px"] < 0
    code, _, err = run(capsys, "sample", out, "--n", "4", "--out", tmp_path / "s.png")
    assert code == 0, err
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--prior", "mogg"], ["unknown prior 'mogg'", "did you mean 'mog'?"]),
        (["--prior", "mog:0"], ["in prior 'mog:0', num_components must be an integer >= 1"]),
        (["--prior", "vamp:x"], ["in prior 'vamp:x', num_components must be an integer >= 1"]),
        (["--prior", "standard:3"], ["prior 'standard' takes no ':K' option", "use plain 'standard'"]),
        (["--prior", "vamp:65"], ["vamp:65 starts its 65 pseudo-inputs", "only 64; use vamp:64 or fewer"]),
        (["--prior", "mog", "--objective", "meanfield"], ["meanfield objective needs a closed-form KL", "trace"]),
        (["--prior", "flow", "--kl-schedule", "free_bits:0.5"], ["free_bits KL schedule", "--prior standard"]),
    ],
    ids=["unknown", "mog:0", "vamp:x", "standard:3", "vamp K > N", "meanfield", "free_bits"],
)
def test_bad_prior_input_is_one_line_and_writes_nothing(args, words, capsys, tmp_path):
    code, _, err = run(capsys, "train", *args, *TINY_CLI, "--out", tmp_path / "run")
    assert code == 2
    assert len(err) == 1 and err[0].startswith("pyro-vae: error: "), err
    assert all(word in err[0] for word in words), err[0]
    assert not (tmp_path / "run").exists()


# Under torchrun the prior is routed through DistributedDataParallel like the networks, so its gradients are averaged
# across ranks: each rank trains on its own images, and the prior's parameters must still agree after the steps.
DDP_WORKER = """
import sys, pyro, torch
import torch.distributed as tdist
from pyro.infer import SVI, Trace_ELBO
from pyro_vae.distributed import context_from_env, init, shutdown, unwrap, wrap
from pyro_vae.model import VAE
from pyro_vae.optim import SingleOptimizer

torch.set_num_threads(1)
ctx = context_from_env("cpu")
init(ctx)
pyro.set_rng_seed(0)
vae = VAE(12, latent_dim=3, hidden_dims=(8,), prior=sys.argv[1])
wrap(vae, ctx)
x = torch.bernoulli(torch.full((8, 12), 0.4), generator=torch.Generator().manual_seed(ctx.rank))  # per rank
svi = SVI(vae.model, vae.guide, SingleOptimizer(torch.optim.SGD, {"lr": 0.1}), Trace_ELBO())
for _ in range(2):
    svi.step(x, 64, torch.arange(8) + 8 * ctx.rank)
mine = torch.cat([p.detach().flatten() for p in vae.prior.parameters()])
both = [torch.zeros_like(mine) for _ in range(2)]
tdist.all_gather(both, mine)
unwrap(vae)
assert vae.routes == ()  # unwrap removes the prior's route too
shutdown()
if ctx.rank == 0:
    print("EQUAL" if torch.equal(both[0], both[1]) else "DIFFERENT")
"""


@pytest.mark.slow  # two processes per prior
@pytest.mark.parametrize("name", LEARNED)
def test_prior_parameters_agree_across_torchrun_ranks(name, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, SPECS[name]], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "EQUAL"
