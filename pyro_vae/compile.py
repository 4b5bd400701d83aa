r"""A compiled training step: the Pyro ELBO's loss and gradients as one ``torch.compile`` graph.

What ``torch._dynamo`` makes of Pyro 1.9.2 directly (``torch.compile`` of ``Trace_ELBO().differentiable_loss(
vae.model, vae.guide, x, N, index)``): 12 graphs and 11 graph breaks per step. The breaks are Pyro's messenger
stack (``sys._getframe``, a ``TypedDict`` with optional keys in ``SubsampleMessenger``) and ``Tensor.item()`` in
``torch_item``, so the per-step Python this module exists to remove would stay.

Instead the step is traced **once**, below the Python level, with
:func:`torch.fx.experimental.proxy_tensor.make_fx`: Pyro runs the model and the guide as usual (plates, messengers,
``param`` and ``sample`` sites, the ELBO's own ``loss_and_grads`` and its ``backward``), and what is recorded is
the ATen operations they issue, forward and backward. The Python decisions (which sites exist, the plate's N/B
scale, shapes) are constants of the graph; the tensors (parameters, ``x``, ``index`` and, with a KL schedule, the
KL weight β) are its inputs, and the noise is an ``aten.normal_`` node inside it. The graph is then compiled by
``torch.compile`` (Inductor) with ``fallback_random=True``, so the compiled ``normal_`` draws from torch's default
generator exactly as the eager step does: compiled and eager steps see the same noise from the same seed. ::

    trace once (make_fx):   params, x, index ──► [model + guide traces, ELBO, backward] ──► loss, grads
    every step:             kl_weight.fill_(schedule.beta())                       # with a KL schedule only
                            loss, grads = compiled(params, x, index[, kl_weight])  # one graph (one launch on CUDA)
                            SingleOptimizer.guard(loss) → optimiser(params)        # the eager guard and fused AdamW

**KL schedules.** β changes every step (the default ``linear:1000`` warm-up, ``constant``, ``cyclical``), so it
cannot be a constant of the graph. The schedule's :class:`~pyro_vae.schedules.KLScaleMessenger` multiplies the
latent site's scale by a 0-dim tensor instead of a number while the step is traced
(:meth:`~pyro_vae.schedules.KLSchedule.weight_input`), that tensor is the graph's fourth input, and the compiled
step writes the schedule's current β into it before each call: one graph serves every β, 0 included (the eager step
multiplies the scale by the number β; Pyro checks a scale > 0 only in ``poutine.scale``'s constructor, which
neither uses). The schedule still advances in :class:`~pyro_vae.step.TrainStep`, and its checkpoint state is unchanged.

Two of Pyro's helpers would bake values into the graph and are swapped for the trace only (they are restored at
once): ``torch_item`` (the loss would become a constant; it becomes a detached tensor, the same number) and
``warn_if_nan`` (reading a traced tensor is an error; the guard checks the loss instead).

What compiles and what falls back (:func:`compile_step` returns ``None`` and logs one line saying why):

* objectives: ``Trace_ELBO`` (``trace``, ``trace:k``), ``TraceMeanField_ELBO`` (``meanfield``), and
  :class:`~pyro_vae.objectives.IWAE_ELBO` with the ``reparam`` or ``stl`` estimator (its ``differentiable_loss``).
  ``iwae:k:dreg`` falls back: its two surrogates have no single differentiable loss.
* KL schedules compile, except ``free_bits``: its per-dimension weights are computed from each minibatch's KL in
  Python, not one number per step (any schedule that overrides :meth:`~pyro_vae.schedules.KLSchedule.process`
  falls back likewise).
* a VAE with routed submodules (DistributedDataParallel) falls back: DDP's gradient hooks are not traceable.
* a guide family whose program reads a tensor's value in Python (data-dependent control flow) falls back; the
  trace detects it.

The last, smaller batch of an epoch runs the eager step (:class:`~pyro_vae.optim.GuardedSVI`): shapes are static,
and a second graph would cost a second compilation to save one eager step per epoch. Steps taken while Pyro
validation is on run eagerly too, so that validation checks the real Pyro program.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled

from pyro_vae._compat import compile_errors, compile_mode_options
from pyro_vae.model import VAE
from pyro_vae.objectives import IWAE_ELBO
from pyro_vae.optim import GuardedSVI, SingleOptimizer
from pyro_vae.schedules import KLSchedule, kl_scaled

logger = logging.getLogger(__name__)

__all__ = ["CompiledStep", "compile_step", "trace_step"]


# --------------------------------------------------------------------------------------------------------------
# Tracing
def _as_tensor(value):
    return value.detach() if torch.is_tensor(value) else value


def _no_warning(value, msg=""):
    return value


@contextlib.contextmanager
def _items_as_tensors(elbo: ELBO) -> Iterator[None]:
    """Inside this context the ELBO's modules keep the loss a tensor: ``torch_item`` detaches instead of calling
    ``.item()``, and ``warn_if_nan`` (which reads the value) does nothing. Both are module globals of Pyro's ELBO
    modules (and of ours), swapped for the duration of one trace."""
    modules = {
        sys.modules[cls.__module__] for cls in type(elbo).__mro__ if cls.__module__.startswith(("pyro", "pyro_vae"))
    }
    saved = []
    for module in modules:
        for name, stand_in in (("torch_item", _as_tensor), ("warn_if_nan", _no_warning)):
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, stand_in)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def _pyro_loss_and_grads(elbo: ELBO, model, guide, args, params) -> torch.Tensor:
    """Pyro's own ``loss_and_grads``: the gradients land in ``.grad``, the loss comes back as a tensor."""
    return elbo.loss_and_grads(model, guide, *args)


def _differentiable(elbo: ELBO, model, guide, args, params) -> torch.Tensor:
    """``differentiable_loss`` and its backward, for objectives whose loss is also their surrogate."""
    loss = elbo.differentiable_loss(model, guide, *args)
    loss.backward()
    return loss.detach()


#: How each supported objective's loss and gradients are produced under the trace, by exact type: a subclass may
#: change the maths, so it falls back until it is listed.
_TRACEABLE: dict[type, Callable[..., torch.Tensor]] = {
    Trace_ELBO: _pyro_loss_and_grads,
    TraceMeanField_ELBO: _pyro_loss_and_grads,
    IWAE_ELBO: _differentiable,
}


@contextlib.contextmanager
def _offline(device: torch.device) -> Iterator[None]:
    """Run a step that is not a training step: Pyro validation off and the RNG state restored afterwards, so the
    caller's noise stream is as if nothing had run."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
        yield


def _param_leaves(model, guide, args) -> list[torch.Tensor]:
    """The unconstrained tensors of every ``param`` site of the model and the guide (what SVI would step)."""
    leaves: dict[int, torch.Tensor] = {}
    for program in (guide, model):
        trace = poutine.trace(program, param_only=True).get_trace(*args)
        for site in trace.nodes.values():
            leaf = site["value"].unconstrained()
            if leaf.requires_grad:
                leaves.setdefault(id(leaf), leaf)
    return list(leaves.values())


def trace_step(
    elbo: ELBO,
    model,
    guide,
    params: list[torch.Tensor],
    x: torch.Tensor,
    num_data: int | None,
    index,
    kl_schedule: KLSchedule | None = None,
):
    """Trace one ELBO step of ``model`` and ``guide`` into an FX graph of ATen operations.

    The trace runs the step for real on ``x`` (``(B, D)``) and ``index`` (``(B,)``), with Pyro validation off and
    the RNG state restored afterwards, so it neither draws from the caller's noise stream nor leaves gradients.

    With ``kl_schedule`` (one with a :attr:`~pyro_vae.schedules.KLSchedule.scalar_weight`), ``model`` and ``guide``
    are the programs :func:`~pyro_vae.schedules.kl_scaled` wrapped with it, and the KL weight β becomes the graph's
    fourth input, a 0-dim tensor (:meth:`~pyro_vae.schedules.KLSchedule.weight_input`), so one graph serves every β.

    :returns: a :class:`torch.fx.GraphModule` ``graph(params, x, index) -> (loss, grads)``, or
        ``graph(params, x, index, kl_weight)`` with a schedule: the loss as a 0-dim tensor and one gradient per
        parameter (``None`` where a parameter gets none).
    :raises RuntimeError: when the program reads a traced tensor's value in Python (data-dependent control flow).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    run = _TRACEABLE[type(elbo)]

    def step(params, x, index, *kl_weight):
        for p in params:
            p.grad = None
        weighted = kl_schedule.weight_input(*kl_weight) if kl_schedule is not None else contextlib.nullcontext()
        with weighted:
            loss = run(elbo, model, guide, (x, num_data, index), params)
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        return loss, grads

    inputs = [params, x, index]
    if kl_schedule is not None:
        inputs.append(x.new_ones(()))  # the value is irrelevant: the graph multiplies by whatever it is given
    with _offline(x.device), _items_as_tensors(elbo):
        return make_fx(step)(*inputs)


# --------------------------------------------------------------------------------------------------------------
# The step
def _fallback_reason(vae: VAE, elbo: ELBO, kl_schedule: KLSchedule | None) -> str | None:
    if vae.kind != "vae":
        return f"--model {vae.kind} passes labels to its Pyro programs, which the traced step does not take"
    if type(elbo) not in _TRACEABLE:
        names = ", ".join(sorted(cls.__name__ for cls in _TRACEABLE))
        return f"objective {type(elbo).__name__} has no traceable loss (compiled: {names})"
    if getattr(elbo, "estimator", None) == "dreg":
        return "the dreg estimator gives the encoder and the decoder two surrogates, so it has no single graph"
    if kl_schedule is not None and not kl_schedule.scalar_weight:
        return (
            f"the {kl_schedule.name} KL schedule weights the latent site by more than one number per step, which "
            "the graph cannot take as an input"
        )
    if vae.routes:
        return f"routed submodules ({', '.join(vae.routes)}, e.g. DistributedDataParallel) are not traceable"
    return None


def compile_step(
    vae: VAE,
    elbo: ELBO,
    optimizer: SingleOptimizer,
    *,
    num_data: int | None,
    batch_size: int,
    device: torch.device | str,
    kl_schedule: KLSchedule | None = None,
    mode: str | None = None,
) -> CompiledStep | None:
    """Build the compiled training step of ``vae`` under ``elbo``, or ``None`` (with one log line saying why)
    when this configuration cannot compile, in which case the caller runs its eager step.

    The graph is traced here, on a batch of zeros of the static shape ``(batch_size, vae.input_dim)``; Inductor
    compiles it on the first full-size step (seconds to minutes: see ``benchmarks/compile_speed.py``).

    :param VAE vae: the model, already on ``device``.
    :param ELBO elbo: the objective (see the module docstring for which compile).
    :param SingleOptimizer optimizer: the optimiser; its guard and fused step run after the graph, unchanged.
    :param num_data: N, the plate's full size (sets the N/B scale, a constant of the graph); ``None`` makes each
        batch the whole data set (N = B), as for the eager step.
    :param int batch_size: B, the static batch size; other batch sizes run eagerly.
    :param device: the device the step runs on. On CUDA the default mode is ``"reduce-overhead"`` (CUDA graphs).
    :param kl_schedule: the KL schedule, if any: its weight β is an input of the graph, written before every step
        (``free_bits``, whose weights depend on the minibatch, falls back to eager).
    :param mode: a ``torch.compile`` mode overriding the default (``None`` on CPU, ``"reduce-overhead"`` on CUDA).
    """
    device = torch.device(device)
    reason = _fallback_reason(vae, elbo, kl_schedule)
    if reason is None:
        model, guide = vae.model, vae.guide
        if kl_schedule is not None:
            model, guide = kl_scaled(model, guide, kl_schedule)  # as TrainStep's eager step weights them
        example = torch.zeros(batch_size, vae.input_dim, device=device)
        index = torch.arange(batch_size, device=device)
        with _offline(device):
            params = _param_leaves(model, guide, (example, num_data, index))
        try:
            graph = trace_step(elbo, model, guide, params, example, num_data, index, kl_schedule)
        except (RuntimeError, NotImplementedError) as error:
            reason = f"the program could not be traced ({str(error).splitlines()[0]})"
    if reason is not None:
        logger.info("compile: falling back to the eager step: %s", reason)
        return None
    if mode is None and device.type == "cuda":
        mode = "reduce-overhead"
    logger.info("compile: traced the step (%d graph nodes); mode=%s", len(graph.graph.nodes), mode)
    return CompiledStep(
        vae,
        elbo,
        optimizer,
        graph,
        params,
        num_data=num_data,
        batch_size=batch_size,
        mode=mode,
        kl_schedule=kl_schedule,
    )


class CompiledStep:
    """One SVI step, ``step(x, index) -> float`` (the loss, summed over the batch and scaled by N/B as Pyro's
    ELBOs report it), run by a compiled graph for batches of the static size and eagerly otherwise.

    Per compiled step: the graph gives the loss and every gradient; :meth:`SingleOptimizer.guard` reads the loss
    (one host sync) and, when it is not finite, replays the step eagerly with the same noise to name the site;
    :class:`~pyro_vae.optim.SingleOptimizer` then checks the gradient norm and takes the fused AdamW step, or
    refuses it (raise or skip), exactly as in the eager step. Build it with :func:`compile_step`.

    :ivar int compiled_steps: steps taken by the graph.
    :ivar int eager_steps: steps taken eagerly (a smaller batch, or Pyro validation on).
    """

    def __init__(
        self,
        vae: VAE,
        elbo: ELBO,
        optimizer: SingleOptimizer,
        graph: torch.fx.GraphModule,
        params: list[torch.Tensor],
        *,
        num_data: int | None,
        batch_size: int,
        mode: str | None,
        kl_schedule: KLSchedule | None = None,
    ):
        self.vae = vae
        self.kl_schedule = kl_schedule
        self.model, self.guide = vae.model, vae.guide
        # β, written from the schedule before every compiled step: the graph's fourth input (see trace_step)
        self.kl_weight: torch.Tensor | None = None
        if kl_schedule is not None:
            self.model, self.guide = kl_scaled(vae.model, vae.guide, kl_schedule)
            self.kl_weight = params[0].new_ones(())
        self.optimizer = optimizer
        self.graph = graph
        self.params = params
        self.num_data = num_data
        self.batch_size = batch_size
        self.mode = mode
        self.compiled_steps = 0
        self.eager_steps = 0
        self.failed: str | None = None  # why Inductor could not compile the graph, once it could not
        self._untried = True
        self._cuda_graphs = mode in ("reduce-overhead", "max-autotune")
        if self._cuda_graphs:
            # parameters (and β) stay at one address, so CUDA graphs need not copy them in per replay
            for p in [*params, *([] if self.kl_weight is None else [self.kl_weight])]:
                torch._dynamo.mark_static_address(p)
        # fallback_random: Inductor calls ATen's normal_ (the default generator) instead of its own Philox stream.
        options = {**compile_mode_options(mode), "fallback_random": True}  # mode= and options= exclude each other
        self._compiled = torch.compile(graph, fullgraph=True, options=options)
        self._eager = GuardedSVI(self.model, self.guide, optimizer, elbo)
        self._guarded = optimizer.guard(self._loss_and_grads)

    def _loss_and_grads(self, model, guide, x, num_data, index) -> torch.Tensor:
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        inputs = [self.params, x, index]
        if self.kl_weight is not None:
            self.kl_weight.fill_(self.kl_schedule.beta())  # the schedule's β at this step, as the eager step reads it
            inputs.append(self.kl_weight)
        with torch.no_grad():  # the graph computes its own gradients; autograd must not wrap it again
            loss, grads = self._compiled(*inputs)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        return loss

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> float:
        """Take one step on the minibatch ``x`` (``(B, D)``) at positions ``index`` (``(B,)``) of the data set.

        The first full-size call compiles. A graph Inductor cannot compile (the spline family's data-dependent
        shapes, in torch 2.14) is a fallback to the eager step for the rest of the run, with one log line, on the
        noise the failed call would have drawn.

        :returns: the loss (negative ELBO estimate) as a float.
        :raises NonFiniteLossError: from the guard, as in the eager step.
        """
        if x.shape[0] != self.batch_size or is_validation_enabled() or self.failed is not None:
            self.eager_steps += 1
            return self._eager.step(x, self.num_data, index)
        if self._untried:
            self._untried = False
            rng = torch.get_rng_state()
            try:
                return self._compiled_step(x, index)
            except compile_errors() as err:
                self.failed = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
                logger.info("compile: falling back to the eager step: Inductor could not compile (%s)", self.failed)
                for p in self.params:
                    p.grad = None
                torch.set_rng_state(rng)
                return self(x, index)
        return self._compiled_step(x, index)

    def _compiled_step(self, x: torch.Tensor, index: torch.Tensor) -> float:
        loss = float(self._guarded(self.model, self.guide, x, self.num_data, index))
        self.optimizer(self.params)
        self.compiled_steps += 1
        return loss
