"""Every private torch or Pyro API that pyro_vae relies on, pinned: if an upgrade changes one, a test here fails
and names it (see pyro_vae/_compat.py)."""

import inspect

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.poutine import runtime

from pyro_vae._compat import (
    announce_param,
    fused_optimizer_devices,
    module_param_name,
    sum_rightmost,
    tag_module_param,
)
from pyro_vae.optim import SingleOptimizer


def test_effectful_keeps_its_signature():
    assert list(inspect.signature(runtime.effectful).parameters) == ["fn", "type"]


def test_announce_param_records_a_param_site_holding_the_tensor_itself():
    p = torch.nn.Parameter(torch.randn(3))
    assert announce_param("w", p, name="w") is p  # outside any handler: the value, untouched
    with poutine.trace() as tracer:
        value = announce_param("w", p, constraint=dist.constraints.real, event_dim=None, name="w")
    site = tracer.trace.nodes["w"]
    assert value is p and site["type"] == "param" and site["value"] is p
    assert len(pyro.get_param_store()) == 0  # never the global store


def test_svi_optimises_the_tensor_that_unconstrained_returns():
    """SVI.step collects ``site["value"].unconstrained()`` of every param site and hands those to the optimiser."""
    assert ".unconstrained()" in inspect.getsource(SVI.step)
    p = torch.nn.Parameter(torch.zeros(2))
    tag_module_param(p, "loc")
    assert p.unconstrained() is p and module_param_name(p) == "loc"
    assert module_param_name(torch.nn.Parameter(torch.zeros(1))) is None

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=torch.ones(2))

    def guide():
        loc = announce_param("loc", p, constraint=dist.constraints.real, event_dim=None, name="loc")
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    optim = SingleOptimizer(torch.optim.SGD, {"lr": 0.1})
    SVI(model, guide, optim, Trace_ELBO()).step()
    assert optim.param_names == ["loc"] and not torch.equal(p.detach(), torch.zeros(2))


def test_param_store_names_through_the_public_lookup():
    """optim.py names store parameters with ParamStoreDict.param_name, which returns None for unknown tensors."""
    store = pyro.get_param_store()
    pyro.param("a", torch.zeros(2))
    assert store.param_name(store.get_param("a").unconstrained()) == "a"
    assert store.param_name(torch.zeros(2)) is None


def test_fused_kernel_probe_lists_cpu_and_the_fused_optimiser_works_there():
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    assert inspect.signature(_get_fused_kernels_supported_devices).parameters == {}
    devices = fused_optimizer_devices()
    assert isinstance(devices, frozenset) and {"cpu", "cuda"} <= devices
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    torch.optim.AdamW([p], lr=0.1, fused=True).step()
    assert torch.all(p < 1)


def test_sum_rightmost_is_independents_reduction_bit_for_bit():
    base = dist.Normal(torch.randn(4, 5, 6), torch.rand(4, 5, 6) + 0.5)
    value = torch.randn(4, 5, 6)
    for n in (0, 1, 2):
        assert torch.equal(sum_rightmost(base.log_prob(value), n), base.to_event(n).log_prob(value))


def test_distribution_subclass_protocol_that_the_fast_classes_use():
    """StandardNormal, BernoulliImage and DiagonalMultivariateNormal use torch's subclassing protocol; the prior cache
    relies on a distribution keeping the validation setting it was built under."""
    with pyro.validation_enabled(True):
        checked = dist.Normal(torch.zeros(()), torch.ones(())).expand([2])
    with pyro.validation_enabled(False):
        unchecked = dist.Normal(torch.zeros(()), torch.ones(())).expand([2])
        assert checked._validate_args is True and unchecked._validate_args is False
    assert checked._batch_shape == (2,) and checked._event_shape == ()
    assert callable(checked._validate_sample) and callable(checked._get_checked_instance)
    assert "_instance" in inspect.signature(torch.distributions.Distribution.expand).parameters


def test_compile_mode_options_are_inductors_table():
    """``torch.compile`` refuses ``mode=`` with ``options=``; the compiled step merges the mode's options with its
    own, so the table must say what each mode means."""
    from pyro_vae._compat import compile_mode_options

    assert compile_mode_options(None) == {}
    assert compile_mode_options("reduce-overhead") == {"triton.cudagraphs": True}
    assert compile_mode_options("max-autotune")["triton.cudagraphs"] is True


def test_compile_errors_are_exception_classes_torch_raises():
    """The compiled step falls back on these and only these: each must still exist and be an exception class."""
    import torch._dynamo.exc
    import torch._inductor.exc

    from pyro_vae._compat import compile_errors

    errors = compile_errors()
    assert errors == (
        torch._inductor.exc.InductorError,
        torch._dynamo.exc.BackendCompilerFailed,
        torch._dynamo.exc.Unsupported,
    )
    assert all(isinstance(e, type) and issubclass(e, Exception) for e in errors)
