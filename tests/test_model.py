"""The VAE as Pyro programs: trace structure, plate scaling, learning, and instance-owned parameters."""

import dataclasses

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae.config import ModelConfig
from pyro_vae.labelled import build_model
from pyro_vae.model import VAE
from pyro_vae.networks import _ACTIVATIONS
from pyro_vae.optim import adamw

D, L, B, N = 12, 3, 10, 100


def tiny_vae(**kw):
    return VAE(D, latent_dim=L, hidden_dims=(16, 8), **kw)


def binary_data(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, D), 0.3), generator=g)


def test_trace_sites_shapes_and_plate_scale():
    vae = tiny_vae()
    x = binary_data()
    guide_trace = poutine.trace(vae.guide).get_trace(x, N)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, N)
    g_samples = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]
    m_samples = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]
    assert g_samples == ["z"]
    assert m_samples == ["z", "x"]
    assert guide_trace.nodes["z"]["value"].shape == (B, L)
    assert model_trace.nodes["x"]["fn"].event_shape == (D,)
    assert model_trace.nodes["x"]["fn"].batch_shape == (B,)
    for site in (guide_trace.nodes["z"], model_trace.nodes["z"], model_trace.nodes["x"]):
        assert site["scale"] == pytest.approx(N / B)
        (frame,) = site["cond_indep_stack"]
        assert frame.name == "data" and frame.size == B and frame.full_size == N
    model_trace.compute_log_prob()
    assert model_trace.nodes["x"]["log_prob"].shape == (B,)


def test_param_sites_cover_every_parameter_and_store_stays_empty():
    vae = tiny_vae()
    x = binary_data()
    with poutine.trace(param_only=True) as capture:
        Trace_ELBO().loss_and_grads(vae.model, vae.guide, x)
    seen = {site["value"] for site in capture.trace.nodes.values()}
    assert seen == set(vae.parameters())
    assert len(pyro.get_param_store()) == 0


def test_explicit_index_is_used_by_the_plate():
    """The plate's subsample site holds the given index in both programs; ignoring it would give arange(B)."""
    vae = tiny_vae()
    x = binary_data()
    index = torch.arange(50, 50 + B).flip(0)
    guide_trace = poutine.trace(vae.guide).get_trace(x, N, index)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, N, index)
    for trace in (guide_trace, model_trace):
        assert torch.equal(trace.nodes["data"]["value"], index)
        (frame,) = trace.nodes["z"]["cond_indep_stack"]
        assert frame.full_size == N and frame.size == B
        assert trace.nodes["z"]["scale"] == pytest.approx(N / B)


def test_every_model_config_field_reaches_the_module_it_names():
    """Each ModelConfig field, set to a non-default value, shows in the built VAE; a new field without a check here
    fails the test (the decoder once ignored ``activation``)."""
    values = {
        "latent_dim": 5,
        "hidden_dims": (24, 12, 6),
        "activation": "relu",
        "guide": "low_rank",
        "guide_options": {"rank": 2},
        "likelihood": "continuous_bernoulli",
        "prior": "mog:3",
        "network": "conv",
        "conv_channels": (4, 6),
        "kind": "cvae",
        "num_classes": 4,
        "aux_weight": 2.5,
    }

    def linears(module):
        return [m for m in module.modules() if isinstance(m, nn.Linear)]

    def activations(module):
        return {type(m) for m in module.modules() if not isinstance(m, (nn.Linear, nn.Sequential)) and m is not module}

    checks = {
        "latent_dim": lambda vae, v: (
            vae.latent_dim == v and vae.family.latent_dim == v and linears(vae.decoder)[0].in_features == v
        ),
        "hidden_dims": lambda vae, v: (
            [m.out_features for m in linears(vae.encoder)[:-1]] == list(v)
            and [m.out_features for m in linears(vae.decoder)[:-1]] == list(reversed(v))
        ),
        "activation": lambda vae, v: (
            activations(vae.encoder.body) == {_ACTIVATIONS[v]} and activations(vae.decoder) == {_ACTIVATIONS[v]}
        ),
        "guide": lambda vae, v: vae.family.name == v,
        "guide_options": lambda vae, v: all(getattr(vae.family, key, None) == value for key, value in v.items()),
        "likelihood": lambda vae, v: vae.likelihood.name == v,
        "prior": lambda vae, v: vae.prior.name == v.partition(":")[0] and vae.prior.num_components == 3,
        "network": lambda vae, v: (
            vae.config.network == v and any(isinstance(m, nn.Conv2d) for m in vae.encoder.modules())
        ),
        "conv_channels": lambda vae, v: (
            [m.out_channels for m in vae.encoder.modules() if isinstance(m, nn.Conv2d)] == list(v)
            and [m.out_channels for m in vae.decoder.modules() if isinstance(m, nn.ConvTranspose2d)][:-1]
            == list(reversed(v))[1:]
        ),
        # The labelled models (pyro_vae.labelled): the class, the one-hot width the decoder reads, M2's α.
        "kind": lambda vae, v: vae.kind == v and type(vae).__name__ == "CVAE",
        "num_classes": lambda vae, v: (
            getattr(vae, "num_classes", None) == v and linears(vae.decoder)[0].in_features == vae.latent_dim + v
        ),
        "aux_weight": lambda vae, v: getattr(vae, "aux_weight", None) == v,
    }
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    assert sorted(checks) == sorted(values) == sorted(fields), "a ModelConfig field has no check here"
    for name in fields:
        default = getattr(ModelConfig(), name)
        assert values[name] != default
        # The options of a family that has them; the widths of the network that has them.
        base = {
            "guide_options": {"guide": "low_rank"},
            "conv_channels": {"network": "conv"},
            "kind": {"num_classes": 3},
            "num_classes": {"kind": "cvae"},
            "aux_weight": {"kind": "m2", "num_classes": 3},
        }.get(name, {})
        shape = (1, 8, 8) if name in ("network", "conv_channels") else None  # conv needs images of 8×8 or more
        dim = 64 if shape else D
        config = ModelConfig(**base, **{name: values[name]})
        if name == "kind":  # a VAE has no classes: the default to compare with is the plain VAE
            base = {}
        if name == "num_classes":
            base = {"kind": "cvae", "num_classes": 3}
        vae = build_model(config, dim, shape)
        assert vae.config == config
        assert checks[name](vae, values[name]), name
        assert not checks[name](build_model(ModelConfig(**base), dim, shape), values[name]), name  # can fail


def structured_data(n=64, seed=0):
    """Two fixed binary prototypes, one per image: learnable down to about log 2 nats per image."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.bernoulli(torch.full((2, D), 0.5), generator=g)
    return prototypes[torch.randint(0, 2, (n,), generator=g)]


def _train(vae, x, steps=150, optim=None):
    svi = SVI(vae.model, vae.guide, optim or adamw(1e-2), Trace_ELBO())
    return [svi.step(x) for _ in range(steps)]


def test_short_training_lowers_the_loss():
    vae = tiny_vae()
    x = structured_data()
    losses = _train(vae, x, steps=300)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    # the start is about D log 2 ≈ 8.3 nats per image; a model that learned the two prototypes gets near log 2.
    assert last / 64 < 3.0 < first / 64


def test_rebuilding_the_model_in_a_notebook_still_learns():
    """Re-running a notebook cell builds a new VAE; the new one must be the one that trains (no shadowing)."""
    x = structured_data()
    first = tiny_vae()
    _train(first, x, steps=20)
    second = tiny_vae()
    before = [p.detach().clone() for p in second.parameters()]
    losses = _train(second, x, steps=300)
    assert all(not torch.equal(b, p) for b, p in zip(before, second.parameters(), strict=True))
    assert sum(losses[-20:]) / 20 / 64 < 3.0 < sum(losses[:20]) / 20 / 64


def test_stock_pyro_optimiser_also_trains_the_instance():
    vae = tiny_vae()
    before = [p.detach().clone() for p in vae.parameters()]
    _train(vae, binary_data(64), steps=3, optim=pyro.optim.Adam({"lr": 1e-2}))
    assert all(not torch.equal(b, p) for b, p in zip(before, vae.parameters(), strict=True))


def test_encode_decode_reconstruct_sample_shapes():
    vae = tiny_vae()
    x = binary_data()
    q = vae.encode(x)
    assert q.batch_shape == (B,) and q.event_shape == (L,)
    assert vae.decode(q.sample()).event_shape == (D,)
    recon = vae.reconstruct(x)
    assert recon.shape == (B, D) and ((recon >= 0) & (recon <= 1)).all()
    samples = vae.sample(7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (7, D)
    again = vae.sample(7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples, again, rtol=0, atol=0)


@pytest.mark.parametrize("guide", ["mvn_diag", "diag_normal"])
def test_vectorised_particles_run(guide):
    from pyro_vae.objectives import make_objective

    vae = tiny_vae(guide=guide)
    svi = SVI(vae.model, vae.guide, adamw(1e-3), make_objective("trace", num_particles=4))
    assert torch.isfinite(torch.tensor(svi.step(binary_data(), N)))


def test_to_device_keeps_param_sites_in_sync():
    vae = tiny_vae()
    x = binary_data()
    poutine.trace(vae.guide).get_trace(x)
    vae.double()
    with poutine.trace(param_only=True) as capture:
        Trace_ELBO().loss_and_grads(vae.model, vae.guide, x.double())
    assert {site["value"] for site in capture.trace.nodes.values()} == set(vae.parameters())


def test_bad_construction():
    with pytest.raises(ValueError, match="input_dim must be a positive integer"):
        VAE(0)


def test_jit_elbos_are_refused_by_name_as_the_readme_says():
    """Pyro's JIT ELBOs look parameters up in the global param store by name; the VAE's parameters never go there
    (README, "Use it from Python"). If Pyro ever lifts this, this test fails and the README must change."""
    import warnings

    from pyro.infer import JitTrace_ELBO

    vae = VAE(20, latent_dim=3, hidden_dims=(16, 8))
    x = torch.bernoulli(torch.full((8, 20), 0.3))
    svi = SVI(vae.model, vae.guide, adamw(1e-2), JitTrace_ELBO())
    with warnings.catch_warnings(), pytest.raises(KeyError, match=r"(encoder|decoder)\."):  # set order decides which
        warnings.simplefilter("ignore")  # torch.jit's tracer warnings are not what this test is about
        svi.step(x, 100)


def _body(method) -> list[str]:
    """The lines of a method's source after its docstring, blank lines left out."""
    import ast
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(method))
    (func,) = ast.parse(source).body
    first = func.body[1].lineno if ast.get_docstring(func) else func.body[0].lineno
    return [line for line in source.splitlines()[first - 1 :] if line.strip()]


@pytest.mark.parametrize("program", ["model", "guide"])
def test_model_and_guide_read_like_textbook_pyro(program):
    """Tutorial 01 prints these sources: a plate and the sample statements, no private helpers, a few lines."""
    body = _body(getattr(VAE, program))
    text = "\n".join(body)
    assert "self._" not in text and "_announce" not in text
    assert len(body) <= 5, text
    assert "with self.data_plate(x, num_data, index):" in text
    assert f'self.announce_params("{program}")' in text
    if program == "model":
        assert 'pyro.sample("z", self.prior(x.shape[0], x))' in text
        assert 'pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)' in text
    else:
        assert 'pyro.sample("z", self.family(self.encoder(x)))' in text


def test_the_body_reader_sees_private_calls():
    """The check above can fail: a method that calls a private helper shows it."""

    class Leaky(VAE):
        def model(self, x, num_data=None, index=None):
            """Docstring."""
            with self._plate(x):
                pass

    assert _body(Leaky.model) == ["    with self._plate(x):", "        pass"]


def test_announce_params_names_sites_by_state_dict_key_and_refuses_unknown_programs():
    from pyro_vae.errors import ConfigError

    vae = tiny_vae()
    for program, prefixes in (("model", ("prior.", "decoder.", "likelihood.")), ("guide", ("encoder.", "family."))):
        with poutine.trace(param_only=True) as capture:
            vae.announce_params(program)
        expected = {k: v for k, v in vae.named_parameters() if k.startswith(prefixes)}
        assert {name: site["value"] for name, site in capture.trace.nodes.items()} == expected
    with pytest.raises(ConfigError, match=r"unknown Pyro program 'gide'.*did you mean 'guide'"):
        vae.announce_params("gide")


def test_data_plate_caches_its_default_index_per_batch_size_and_device():
    vae = tiny_vae()
    x = binary_data()
    with vae.data_plate(x, N) as first:
        pass
    with vae.data_plate(x, N) as again:
        pass
    assert torch.equal(first, torch.arange(B)) and again is first  # built once, not per step
    with vae.data_plate(x[:4]) as short:
        assert torch.equal(short, torch.arange(4))
    vae.double()  # may move tensors: the cache is rebuilt
    with vae.data_plate(x.double(), N) as moved:
        assert moved is not first and torch.equal(moved, first)


class CountingWrapper(nn.Module):
    """A wrapper that, like DistributedDataParallel, holds the module and calls it."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls, self.fail = module, 0, False

    def forward(self, *args):
        self.calls += 1
        if self.fail:
            raise RuntimeError("wrapper failed")
        return self.module(*args)


def _elbo_and_param_names(vae, x):
    pyro.set_rng_seed(0)
    with poutine.trace(param_only=True) as capture:
        loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, N)
    grads = torch.autograd.grad(loss, list(vae.parameters()))
    return loss, grads, list(capture.trace.nodes)


def test_routes_run_the_wrappers_and_leave_state_dict_and_parameters_alone():
    vae = tiny_vae(guide="iaf:1")  # a family with parameters of its own, so all four submodules are routable
    x = binary_data()
    keys, params = list(vae.state_dict()), list(vae.parameters())
    plain = _elbo_and_param_names(vae, x)
    names = ("encoder", "decoder", "family", "likelihood")
    wrappers = {name: CountingWrapper(getattr(vae, name)) for name in names}
    vae.route(**wrappers)
    assert vae.routes == tuple(sorted(names))
    assert list(vae.state_dict()) == keys and list(vae.parameters()) == params
    routed = _elbo_and_param_names(vae, x)
    assert {name: w.calls for name, w in wrappers.items()} == dict.fromkeys(names, 1)  # once per program call
    assert torch.equal(routed[0], plain[0]) and routed[2] == plain[2]
    assert all(torch.equal(a, b) for a, b in zip(routed[1], plain[1], strict=True))
    vae.sample(3)  # every call of a routed submodule goes through its wrapper, not only the programs'
    assert wrappers["decoder"].calls == 2
    with vae.unrouted():
        _elbo_and_param_names(vae, x)
        assert vae.routes == ()
        assert all("forward" not in getattr(vae, name).__dict__ for name in names)
    assert {name: w.calls for name, w in wrappers.items()} == {**dict.fromkeys(names, 1), "decoder": 2}
    wrappers["encoder"].fail = True  # a wrapper that raises leaves the route usable
    with pytest.raises(RuntimeError, match="wrapper failed"):
        _elbo_and_param_names(vae, x)
    wrappers["encoder"].fail = False
    _elbo_and_param_names(vae, x)
    assert wrappers["encoder"].calls == 3
    vae.route(**dict.fromkeys(names))
    assert vae.routes == ()
    assert all("forward" not in getattr(vae, name).__dict__ for name in names)
    _elbo_and_param_names(vae, x)
    assert wrappers["encoder"].calls == 3


def test_routing_a_name_that_is_not_a_submodule_is_refused_before_any_route_is_set():
    from pyro_vae.errors import ConfigError

    vae = tiny_vae()
    with pytest.raises(ConfigError, match=r"unknown routable submodule 'decodr'.*did you mean 'decoder'"):
        vae.route(encoder=CountingWrapper(vae.encoder), decodr=CountingWrapper(vae.decoder))
    assert "forward" not in vae.encoder.__dict__
