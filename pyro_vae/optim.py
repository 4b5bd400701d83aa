"""One torch optimiser for all parameters, behind Pyro's :class:`~pyro.optim.PyroOptim` interface.

Pyro's stock ``PyroOptim`` builds one torch optimiser per parameter tensor: a Python loop per step and no fused or
multi-tensor kernels. :class:`SingleOptimizer` builds ONE optimiser (AdamW by default, ``fused=True`` where the
platform has the kernel) over every parameter :class:`~pyro.infer.SVI` hands it, so ``SVI.step`` updates all
parameters in a single kernel launch. It also sees every gradient before the step, which is where the gradient
norm is measured, clipped, and checked for NaN or infinity (a non-finite gradient means no step).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pyro.optim import PyroOptim

from pyro_vae.errors import NonFiniteLossError

logger = logging.getLogger(__name__)

__all__ = ["SingleOptimizer", "adamw"]


def _param_name(p: torch.Tensor) -> str:
    """Stable name of a parameter SVI handed over: its VAE site name, else its Pyro param-store name."""
    import pyro

    name = getattr(p, "_pyro_vae_site_name", None) or pyro.get_param_store()._param_to_name.get(p)
    if name is None:
        raise TypeError(
            f"cannot order a parameter of shape {tuple(p.shape)} that has no Pyro name; create it with "
            "pyro.param or inside a pyro_vae.VAE"
        )
    return name


def _fused_supported(params: list[torch.Tensor]) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in supported and p.dtype.is_floating_point for p in params)


class SingleOptimizer(PyroOptim):
    """Steps one torch optimiser over every parameter that :class:`~pyro.infer.SVI` hands it.

    The optimiser is built lazily, on the first call, over the parameters of that call, ordered by name so that
    its ``state_dict`` is the same in every process. Parameters that appear later join as a new parameter group.

    :param optim_constructor: a :class:`torch.optim.Optimizer` class (default :class:`torch.optim.AdamW`).
    :param dict optim_args: its keyword arguments, e.g. ``{"lr": 1e-3}``.
    :param clip_norm: clip the total gradient 2-norm to this value (``None``: no clipping).
    :param fused: ``True`` forces the fused kernel, ``False`` forbids it, ``None`` (default) uses it where the
        devices support it and the optimiser accepts ``fused``.

    After each step :attr:`grad_norm` holds the total gradient norm before clipping (a float).
    """

    def __init__(
        self,
        optim_constructor: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        optim_args: dict[str, Any] | None = None,
        *,
        clip_norm: float | None = None,
        fused: bool | None = None,
    ):
        optim_args = dict(optim_args or {"lr": 1e-3})
        super().__init__(optim_constructor, optim_args)
        if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive finite number or None, got {clip_norm!r}")
        self.clip_norm = clip_norm
        self.fused = fused
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.Tensor] = []
        self.param_names: list[str] = []
        self._known: set[int] = set()
        self._pending_state: dict | None = None
        self.grad_norm: float = float("nan")
        self.steps = 0

    # --------------------------------------------------------------------------------------------------------
    def _build(self, params: list[torch.Tensor]) -> None:
        kwargs = dict(self.pt_optim_args)
        accepts_fused = "fused" in self.pt_optim_constructor.__init__.__code__.co_varnames
        use_fused = self.fused if self.fused is not None else (accepts_fused and _fused_supported(params))
        if use_fused and not accepts_fused:
            raise ValueError(f"{self.pt_optim_constructor.__name__} has no fused implementation; pass fused=None")
        if use_fused:
            kwargs["fused"] = True
        self.optimizer = self.pt_optim_constructor(params, **kwargs)
        logger.debug("built %s over %d tensors (fused=%s)", type(self.optimizer).__name__, len(params), use_fused)
        if self._pending_state is not None:
            self._load_into_optimizer(self._pending_state)
            self._pending_state = None

    def _adopt(self, params: Iterable[torch.Tensor]) -> None:
        new = [p for p in params if id(p) not in self._known]
        if not new:
            return
        named = sorted(((_param_name(p), p) for p in new), key=lambda item: item[0])
        tensors = [p for _, p in named]
        self.params += tensors
        self.param_names += [n for n, _ in named]
        self._known.update(id(p) for p in tensors)
        if self.optimizer is None:
            self._build(tensors)
        else:
            self.optimizer.add_param_group({"params": tensors})

    def __call__(self, params: Iterable[torch.Tensor], *args, **kwargs) -> None:
        """One optimiser step over ``params`` (the set SVI collected from the trace)."""
        self._adopt(params)
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        total = torch.nn.utils.get_total_norm(grads, foreach=True)
        self.grad_norm = float(total)
        if not math.isfinite(self.grad_norm):
            bad = [
                n
                for n, p in zip(self.param_names, self.params, strict=True)
                if p.grad is not None and not p.grad.isfinite().all()
            ]
            for p in self.params:
                p.grad = None
            raise NonFiniteLossError(
                f"non-finite gradient at optimiser step {self.steps + 1} in {', '.join(bad[:5])}"
                f"{' …' if len(bad) > 5 else ''}; no step was taken and the parameters are unchanged"
            )
        if self.clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_norm, total, foreach=True)
        self.optimizer.step(*args, **kwargs)
        self.steps += 1
        # Drop the gradients instead of letting SVI zero them: pyro.infer.util.zero_grads allocates a zero tensor
        # per parameter, and backward then accumulates into it instead of writing the fresh gradient in place.
        for p in self.params:
            p.grad = None

    # --------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The optimiser state plus the parameter names it is keyed by and the step count (tensors and plain
        Python values only, loadable with ``torch.load(weights_only=True)``)."""
        if self.optimizer is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        return {"optimizer": self.optimizer.state_dict(), "param_names": list(self.param_names), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied at once, or at the first step if the optimiser is not built yet."""
        if not state:
            return
        self.steps = int(state.get("steps", 0))
        if self.optimizer is None:
            self._pending_state = state
        else:
            self._load_into_optimizer(state)

    def _load_into_optimizer(self, state: dict[str, Any]) -> None:
        if list(state["param_names"]) != self.param_names:
            raise ValueError(
                "optimiser state was saved for different parameters: "
                f"{len(state['param_names'])} saved vs {len(self.param_names)} now; was the model config changed?"
            )
        self.optimizer.load_state_dict(state["optimizer"])

    # Pyro's own persistence unpickles with weights_only=False; route users to the safe pair above.
    def get_state(self) -> dict:
        return self.state_dict()

    def set_state(self, state_dict: dict) -> None:
        self.load_state_dict(state_dict)

    def save(self, filename: str) -> None:
        raise NotImplementedError("use pyro_vae.checkpoint.save_checkpoint, which writes atomically")

    def load(self, filename: str, map_location=None) -> None:
        raise NotImplementedError("use pyro_vae.checkpoint.load_checkpoint, which loads with weights_only=True")


def adamw(lr: float = 1e-3, weight_decay: float = 0.0, *, clip_norm: float | None = None) -> SingleOptimizer:
    """A :class:`SingleOptimizer` over :class:`torch.optim.AdamW`, fused where supported.

    The default ``weight_decay=0`` keeps the objective the plain ELBO (torch's default of 0.01 would add a decay).
    """
    return SingleOptimizer(torch.optim.AdamW, {"lr": lr, "weight_decay": weight_decay}, clip_norm=clip_norm)
