"""Every private torch or Pyro API pyro_vae relies on, each behind one small documented function.

A private name may change in any release. Keeping every use here means one file to read when torch or Pyro is
upgraded, and ``tests/test_compat.py`` pins each one (it exists, has the signature and the behaviour relied on), so
an upgrade that breaks one fails there, by name, instead of deep inside a training step.

=================================================  ===========================================================
private thing                                      used for
=================================================  ===========================================================
``pyro.poutine.runtime.effectful``                 :func:`announce_param`: a ``param`` site holding a module's
                                                   own tensor (what ``PyroModule`` does for module-local params)
``tensor.unconstrained`` (Pyro's param protocol)   :func:`tag_module_param`: ``SVI.step`` calls it on every
                                                   ``param`` site's value to find the tensor to optimise
``torch.utils._foreach_utils.``                    :func:`fused_optimizer_devices`: where ``fused=True`` works
``_get_fused_kernels_supported_devices``
``torch.distributions.utils._sum_rightmost``       :func:`sum_rightmost`: ``Independent``'s event reduction
=================================================  ===========================================================

The parameter-name map once read directly (``ParamStoreDict._param_to_name``) has a public twin,
:meth:`~pyro.params.param_store.ParamStoreDict.param_name`, which :mod:`pyro_vae.optim` now calls.

Not wrapped: the ``torch.distributions.Distribution`` subclassing protocol (``_validate_args``,
``_validate_sample``, ``_batch_shape``, ``_event_shape``, ``_get_checked_instance``, the ``_instance`` argument of
``expand``), which every torch distribution subclass uses and torch documents for that purpose; the test file pins
it all the same.
"""

from __future__ import annotations

import weakref

import torch
from pyro.poutine.runtime import effectful
from torch.distributions.utils import _sum_rightmost

__all__ = [
    "compile_errors",
    "compile_mode_options",
    "announce_param",
    "fused_optimizer_devices",
    "module_param_name",
    "sum_rightmost",
    "tag_module_param",
]

#: The attribute under which :func:`tag_module_param` stores a module parameter's stable name on the tensor.
_SITE_NAME = "_pyro_vae_site_name"


def _own_value(name: str, value: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return value


#: ``announce_param(name, tensor, constraint=..., event_dim=None, name=name)`` records a ``param`` site whose value is
#: ``tensor`` itself and returns it; outside any handler it just returns ``tensor``. Built once: wrapping per call
#: would cost a ``functools.wraps`` on every parameter of every step.
announce_param = effectful(_own_value, type="param")


def tag_module_param(p: torch.Tensor, name: str) -> None:
    """Prepare a module parameter for :func:`announce_param`: ``SVI.step`` asks every ``param`` site's value for
    ``.unconstrained()`` (the tensor to optimise; here the parameter itself), and :func:`module_param_name` returns
    ``name`` afterwards.

    :param p: an ``nn.Parameter``.
    :param str name: its stable name, e.g. ``"encoder.body.0.weight"``.
    """
    p.unconstrained = weakref.ref(p)
    setattr(p, _SITE_NAME, name)


def module_param_name(p: torch.Tensor) -> str | None:
    """The name :func:`tag_module_param` gave ``p``, or ``None``."""
    return getattr(p, _SITE_NAME, None)


def fused_optimizer_devices() -> frozenset[str]:
    """Device types (``"cpu"``, ``"cuda"``, ...) on which torch's optimisers accept ``fused=True``."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return frozenset(_get_fused_kernels_supported_devices())


def sum_rightmost(value: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum the ``dim`` rightmost dimensions of ``value``, exactly as :class:`~torch.distributions.Independent`
    reduces its base's log-density (the same reshape and sum, hence the same bits)."""
    return _sum_rightmost(value, dim)


def compile_mode_options(mode: str | None) -> dict:
    """The Inductor options a ``torch.compile`` mode stands for (``"reduce-overhead"`` → CUDA graphs), so that a
    caller can add options of its own: ``torch.compile`` refuses ``mode=`` and ``options=`` together.
    ``torch._inductor.list_mode_options`` is the table ``torch.compile``'s own docstring points to."""
    import torch._inductor

    return {} if mode is None else dict(torch._inductor.list_mode_options(mode))


def compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions with which ``torch.compile`` reports, at the first call, that it could not compile a graph
    (dynamo's ``Unsupported`` and ``BackendCompilerFailed``, Inductor's ``InductorError``): the compiled step falls
    back to eager on these, and only these."""
    import torch._dynamo.exc
    import torch._inductor.exc

    return (torch._inductor.exc.InductorError, torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported)
