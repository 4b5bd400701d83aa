"""One torch optimiser for all parameters, behind Pyro's :class:`~pyro.optim.PyroOptim` interface.

Pyro's stock ``PyroOptim`` builds one torch optimiser per parameter tensor: a Python loop per step and no fused or
multi-tensor kernels. :class:`SingleOptimizer` builds ONE optimiser (AdamW by default, ``fused=True`` where the
platform has the kernel) over every parameter :class:`~pyro.infer.SVI` hands it, so ``SVI.step`` updates all
parameters in a single kernel launch. It also sees every gradient before the step, which is where the gradient
norm is measured, clipped, and checked for NaN or infinity.

The non-finite guard: a NaN or an infinity in the loss or in any gradient means **no step**. The parameters and the
optimiser state stay exactly as they were before the bad batch. By default the optimiser raises
:class:`~pyro_vae.errors.NonFiniteLossError` naming the parameter (for a gradient) or the Pyro sample site (for the
loss) involved; ``on_nonfinite="skip"`` skips such batches instead, at most ``max_skips`` times. Pyro's ``SVI.step``
hands the optimiser only the parameters, so :class:`GuardedSVI` (a plain :class:`~pyro.infer.SVI` whose
``loss_and_grads`` passes through :meth:`SingleOptimizer.guard`) shows it the loss too; Pyro itself steps on any
loss, and warns only for NaN.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.optim import PyroOptim

from pyro_vae._compat import fused_optimizer_devices, module_param_name
from pyro_vae.config import NONFINITE_POLICIES, check_float, check_int
from pyro_vae.errors import NonFiniteLossError, unknown_choice

logger = logging.getLogger(__name__)

__all__ = ["GuardedSVI", "NonFiniteStep", "SingleOptimizer", "adamw", "nonfinite_sites"]


class NonFiniteStep(NamedTuple):
    """A step the guard refused.

    :ivar str kind: ``"loss"``, ``"gradient"`` or ``"value"`` (Pyro's validation refused a non-finite parameter or
        value while the step was traced, so there is no loss).
    :ivar float loss: the loss of that step (NaN or ±inf for ``kind="loss"``, NaN for ``"value"``).
    :ivar tuple names: for a gradient, the parameters whose gradient is not finite (never empty); for the loss and
        a value, the parameters and sample sites that are not finite in a replay of the step (same inputs, same
        noise, validation off), in execution order, e.g. ``("model site 'z' (log_prob -inf)",)``.
    :ivar int optimizer_step: the number the refused step would have had (``steps + 1``).
    """

    kind: str
    loss: float
    names: tuple[str, ...]
    optimizer_step: int

    def describe(self) -> str:
        """One line: what was not finite, and where."""
        if self.kind == "gradient":
            where = ", ".join(self.names[:5]) + (" …" if len(self.names) > 5 else "")
            return f"non-finite gradient at optimiser step {self.optimizer_step} in {where}"
        if self.kind == "value":
            where = f"first at {self.names[0]}" + (
                f" (then {', '.join(self.names[1:4])})" if len(self.names) > 1 else ""
            )
            return f"non-finite value at optimiser step {self.optimizer_step} (Pyro's validation refused it), {where}"
        where = (
            f"first at {self.names[0]}" + (f" (then {', '.join(self.names[1:4])})" if len(self.names) > 1 else "")
            if self.names
            else "no single sample site is non-finite in a replay of the step (the sum overflowed)"
        )
        return f"non-finite loss ({self.loss}) at optimiser step {self.optimizer_step}, {where}"


def _finite(value: Any) -> bool:
    return bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else math.isfinite(value)


def nonfinite_sites(
    model: Callable, guide: Callable, *args, rng_state: torch.Tensor | None = None, **kwargs
) -> list[str]:
    """Replay ``guide`` and ``model`` on the same inputs and name the sites that are not finite.

    The guide is traced and the model replayed on its samples, as :class:`~pyro.infer.Trace_ELBO` does, under
    :func:`torch.no_grad`, validation off and a forked RNG stream (so the caller's noise is not consumed). Given
    ``rng_state`` (the CPU generator's state before the step) the replay draws the very noise of that step.

    :returns: descriptions such as ``"guide param 'encoder.net.0.weight'"`` or ``"model site 'x' (log_prob nan)"``,
        in execution order (the first one is the cause, the later ones usually its consequences); a replay that
        raises itself is described as such.
    """
    try:
        return _replay_nonfinite(model, guide, args, kwargs, rng_state)
    except (ValueError, RuntimeError) as err:
        return [f"a replay of the step that failed itself ({type(err).__name__}: {str(err).splitlines()[0]})"]


def _replay_nonfinite(model: Callable, guide: Callable, args: tuple, kwargs: dict, rng_state) -> list[str]:
    """:func:`nonfinite_sites` without the error handling: a replay that fails raises."""
    found: list[str] = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        for program, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "param" and not _finite(site["value"]):
                    found.append(f"{program} param {name!r}")
                elif site["type"] == "sample":
                    if not _finite(site["value"]):
                        found.append(f"{program} site {name!r} (value)")
                        continue
                    log_prob = site["fn"].log_prob(site["value"])
                    if not _finite(log_prob):
                        worst = log_prob[~torch.isfinite(log_prob)].flatten()[0].item()
                        found.append(f"{program} site {name!r} (log_prob {worst})")
    return found


def _param_name(p: torch.Tensor) -> str:
    """Stable name of a parameter SVI handed over: its VAE site name, else its Pyro param-store name."""
    name = module_param_name(p) or pyro.get_param_store().param_name(p)
    if name is None:
        raise TypeError(
            f"cannot order a parameter of shape {tuple(p.shape)} that has no Pyro name; create it with "
            "pyro.param or inside a pyro_vae.VAE"
        )
    return name


def _fused_supported(params: list[torch.Tensor]) -> bool:
    supported = fused_optimizer_devices()
    return all(p.device.type in supported and p.dtype.is_floating_point for p in params)


def _wide_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The total 2-norm of finite gradients whose norm overflowed in their own precision: in float64, after dividing
    by the largest ``|g|``, so that the sum of squares cannot overflow (it is at most the number of elements). It is
    infinite only when the norm itself exceeds float64's range (about 1.8e308)."""
    grads = [g for g in grads if g.numel()]
    largest = max((float(g.abs().max()) for g in grads), default=0.0)
    if largest == 0.0:
        return torch.zeros((), dtype=torch.float64)
    return torch.nn.utils.get_total_norm([g.double() / largest for g in grads], foreach=True) * largest


class SingleOptimizer(PyroOptim):
    """Steps one torch optimiser over every parameter that :class:`~pyro.infer.SVI` hands it.

    The optimiser is built lazily, on the first call, over the parameters of that call, ordered by name so that
    its ``state_dict`` is the same in every process. Parameters that appear later join as a new parameter group.

    :param optim_constructor: a :class:`torch.optim.Optimizer` class (default :class:`torch.optim.AdamW`).
    :param dict optim_args: its keyword arguments, e.g. ``{"lr": 1e-3}``.
    :param clip_norm: clip the total gradient 2-norm to this value (``None``: no clipping).
    :param fused: ``True`` forces the fused kernel, ``False`` forbids it, ``None`` (default) uses it where the
        devices support it and the optimiser accepts ``fused``.
    :param str on_nonfinite: ``"raise"`` (default): a non-finite loss or gradient raises
        :class:`~pyro_vae.errors.NonFiniteLossError`; ``"skip"``: the batch is skipped with a warning.
    :param max_skips: with ``"skip"``, the most batches that may be skipped in total (``None``: no limit); the next
        one raises.

    Either way no step is taken on a non-finite loss or gradient, and parameters and optimiser state stay as they
    were. After each step :attr:`grad_norm` holds the total gradient norm before clipping (a float);
    :attr:`skipped` counts skipped batches and :attr:`last_nonfinite` describes the last refused step.
    """

    def __init__(
        self,
        optim_constructor: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        optim_args: dict[str, Any] | None = None,
        *,
        clip_norm: float | None = None,
        fused: bool | None = None,
        on_nonfinite: str = "raise",
        max_skips: int | None = None,
    ):
        optim_args = dict(optim_args or {"lr": 1e-3})
        super().__init__(optim_constructor, optim_args)
        check_float("clip_norm", clip_norm, low=0, open_low=True, allow_none=True)
        if on_nonfinite not in NONFINITE_POLICIES:
            raise unknown_choice("non-finite policy", on_nonfinite, NONFINITE_POLICIES)
        check_int("max_skips", max_skips, low=0, allow_none=True)
        self.clip_norm = clip_norm
        self.fused = fused
        self.on_nonfinite = on_nonfinite
        self.max_skips = max_skips
        self.skipped = 0
        self.last_nonfinite: NonFiniteStep | None = None
        self._bad_loss: NonFiniteStep | None = None
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

    def guard(self, loss_and_grads: Callable) -> Callable:
        """Wrap an ELBO's ``loss_and_grads(model, guide, *args, **kwargs)`` so that the loss it returns reaches this
        optimiser's non-finite guard before the step. A non-finite loss is diagnosed at once, by replaying the step
        with the same noise (:func:`nonfinite_sites`); a finite one costs a ``math.isfinite`` and an RNG-state copy.

        With Pyro's validation on, a non-finite parameter or sample makes Pyro raise a ``ValueError`` before there
        is a loss. If a replay of the step (validation off) finds non-finite values, the step is refused like a
        non-finite loss (``kind="value"``, returned loss NaN); any other ``ValueError`` propagates unchanged.
        """

        @functools.wraps(loss_and_grads)
        def guarded(model, guide, *args, **kwargs):
            rng_state = torch.get_rng_state()  # about a microsecond; lets a bad step be replayed exactly
            try:
                loss = loss_and_grads(model, guide, *args, **kwargs)
            except ValueError as err:
                self._bad_loss = self._diagnose_validation_error(err, model, guide, args, kwargs, rng_state)
                return float("nan")
            value = float(loss) if not isinstance(loss, tuple) else math.fsum(map(float, loss))
            if not math.isfinite(value):
                names = nonfinite_sites(model, guide, *args, rng_state=rng_state, **kwargs)
                self._bad_loss = NonFiniteStep("loss", value, tuple(names), self.steps + 1)
            return loss

        return guarded

    def _diagnose_validation_error(
        self, err: ValueError, model: Callable, guide: Callable, args: tuple, kwargs: dict, rng_state: torch.Tensor
    ) -> NonFiniteStep:
        """The refused step behind a ``ValueError`` raised while the step was traced, or ``err`` itself re-raised
        when a replay finds every value finite (a shape or support error, not a non-finite one)."""
        try:
            names = _replay_nonfinite(model, guide, args, kwargs, rng_state)
        except (ValueError, RuntimeError):
            names = []
        if not names:
            raise err
        return NonFiniteStep("value", float("nan"), tuple(names), self.steps + 1)

    def __call__(self, params: Iterable[torch.Tensor], *args, **kwargs) -> None:
        """One optimiser step over ``params`` (the set SVI collected from the trace), unless the loss or a gradient
        is not finite."""
        refused, self._bad_loss = self._bad_loss, None
        if refused is None or refused.kind != "value":
            self._adopt(params)  # a step stopped by validation handed over only the parameters traced before it
        grads = [p.grad for p in self.params if p.grad is not None]
        if refused is None and grads:
            total = torch.nn.utils.get_total_norm(grads, foreach=True)
            self.grad_norm = float(total)
            if not math.isfinite(self.grad_norm):
                total, refused = self._overflowed(total)
        if refused is not None:
            for p in self.params:
                p.grad = None
            self._refuse(refused)
            return
        if not grads:
            return
        if self.clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_norm, total, foreach=True)
        self.optimizer.step(*args, **kwargs)
        self.steps += 1
        # Drop the gradients instead of letting SVI zero them: pyro.infer.util.zero_grads allocates a zero tensor
        # per parameter, and backward then accumulates into it instead of writing the fresh gradient in place.
        for p in self.params:
            p.grad = None

    def _overflowed(self, total: torch.Tensor) -> tuple[torch.Tensor, NonFiniteStep | None]:
        """After a non-finite total norm: the refused step naming every parameter whose gradient is not finite, or,
        when every gradient is finite and only the norm overflowed (float32 overflows at |g| ~ 1e19), the norm
        recomputed without overflow (:func:`_wide_norm`) and no refusal."""
        bad = [
            n
            for n, p in zip(self.param_names, self.params, strict=True)
            if p.grad is not None and not p.grad.isfinite().all()
        ]
        if bad:
            return total, NonFiniteStep("gradient", float("nan"), tuple(bad), self.steps + 1)
        total = _wide_norm([p.grad for p in self.params if p.grad is not None])
        self.grad_norm = float(total)
        logger.debug("gradient norm %.3g overflowed in float32 with every gradient finite", self.grad_norm)
        return total, None

    def _refuse(self, refused: NonFiniteStep) -> None:
        self.last_nonfinite = refused
        unchanged = "no step was taken and the parameters are unchanged"
        if self.on_nonfinite == "skip" and (self.max_skips is None or self.skipped < self.max_skips):
            self.skipped += 1
            logger.warning("%s; %s (skipped %d so far)", refused.describe(), unchanged, self.skipped)
            return
        message = f"{refused.describe()}; {unchanged}"
        if self.on_nonfinite == "skip":
            message += f"; {self.skipped} batches were skipped already, the most max_skips={self.max_skips} allows"
        error = NonFiniteLossError(message)
        # What a caller needs to phrase its advice: the step, and the policy in force when it was refused.
        error.step = refused
        error.on_nonfinite = self.on_nonfinite
        error.skipped = self.skipped
        error.max_skips = self.max_skips
        raise error

    # --------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The optimiser state plus the parameter names it is keyed by, the step count, the number of skipped
        batches and the last gradient norm (tensors and plain Python values only, loadable with
        ``torch.load(weights_only=True)``)."""
        if self.optimizer is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        return {
            "optimizer": self.optimizer.state_dict(),
            "param_names": list(self.param_names),
            "steps": self.steps,
            "skipped": self.skipped,
            "grad_norm": self.grad_norm,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied at once, or at the first step if the optimiser is not built yet."""
        if not state:
            return
        self.steps = int(state.get("steps", 0))
        self.skipped = int(state.get("skipped", 0))
        self.grad_norm = float(state.get("grad_norm", float("nan")))
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


def adamw(
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    *,
    clip_norm: float | None = None,
    on_nonfinite: str = "raise",
    max_skips: int | None = None,
) -> SingleOptimizer:
    """A :class:`SingleOptimizer` over :class:`torch.optim.AdamW`, fused where supported.

    The default ``weight_decay=0`` keeps the objective the plain ELBO (torch's default of 0.01 would add a decay).
    ``on_nonfinite`` and ``max_skips`` set the non-finite guard (see :class:`SingleOptimizer`).
    """
    return SingleOptimizer(
        torch.optim.AdamW,
        {"lr": lr, "weight_decay": weight_decay},
        clip_norm=clip_norm,
        on_nonfinite=on_nonfinite,
        max_skips=max_skips,
    )


class GuardedSVI(SVI):
    """:class:`pyro.infer.SVI` whose loss, not only its gradients, reaches the optimiser's non-finite guard.

    ``SVI.step`` is Pyro's own; only ``loss_and_grads`` is wrapped by :meth:`SingleOptimizer.guard`, so a NaN or
    infinite loss means no step even when every gradient happens to be finite (a guide scale of 1e20 gives an
    infinite loss with finite gradients).

    :param model: the Pyro model.
    :param guide: the Pyro guide.
    :param SingleOptimizer optim: the optimiser whose guard sees the loss.
    :param loss: a :class:`pyro.infer.ELBO` (or a loss callable, as :class:`~pyro.infer.SVI` accepts).
    """

    def __init__(self, model: Callable, guide: Callable, optim: SingleOptimizer, loss, **kwargs):
        if not isinstance(optim, SingleOptimizer):
            raise TypeError(f"GuardedSVI needs a SingleOptimizer, got {type(optim).__name__}")
        super().__init__(model, guide, optim, loss, **kwargs)
        self.loss_and_grads = optim.guard(self.loss_and_grads)
