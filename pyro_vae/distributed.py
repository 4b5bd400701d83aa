"""Several processes (and GPUs) through PyTorch's own stack: ``torchrun`` + ``torch.distributed`` +
:class:`~torch.nn.parallel.DistributedDataParallel`. Nothing here communicates by hand.

How a Pyro SVI step becomes data-parallel:

* each process reads its place from torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and joins a
  process group (``nccl`` with one GPU per local rank, ``gloo`` on CPU);
* :func:`wrap` puts every submodule of the VAE that has trainable parameters (encoder, decoder, and a flow family's
  networks) inside its own ``DistributedDataParallel`` and *routes* the VAE's forward passes through it
  (:meth:`pyro_vae.model.VAE.route`). ``vae.model`` and ``vae.guide`` therefore call the DDP modules, and the
  ``backward()`` that :class:`~pyro.infer.Trace_ELBO` runs inside ``SVI.step`` fires DDP's gradient hooks, which
  all-reduce (average) each gradient bucket across processes while backward is still running. The optimiser then
  sees averaged gradients; its step is identical on every rank, so the replicas stay equal;
* each rank's minibatch is a shard of a permutation that is a pure function of (seed, epoch)
  (:class:`pyro_vae.data.EpochBatches` with ``rank`` and ``world_size``), and its ELBO uses
  ``pyro.plate(size=N_global, subsample=local indices)``: every rank's loss is an unbiased estimate of the full-data
  ELBO, so the average of their gradients is too, with the variance of a global batch of ``world_size × B``;
* every rank draws the guide's noise from its own stream (:func:`noise_seed`).

The life cycle is two context managers::

    with session(config) as ctx:        # joins the process group under torchrun; ctx is None outside it
        with ddp(vae, ctx):             # routes the VAE through DDP; unrouted again on exit
            ...                         # train
        ...                             # evaluate per rank, unrouted

:func:`session` leaves a process group it did not create (a caller's own) as it found it.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pyro_vae.config import DIST_BACKENDS, RunConfig
from pyro_vae.data import derive_seed
from pyro_vae.errors import ConfigError
from pyro_vae.model import VAE
from pyro_vae.stats import MeanSE, Moments, moments

logger = logging.getLogger(__name__)

BACKENDS = DIST_BACKENDS


class DistributedContext(NamedTuple):
    """Where this process stands in a torchrun job."""

    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes metrics, figures and checkpoints."""
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error that says so."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _env_int(name: str, env) -> int:
    value = env.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def context_from_env(device: str = "auto", backend: str = "auto", env=None) -> DistributedContext | None:
    """Read torchrun's environment. Returns ``None`` when the process was not launched by torchrun.

    :param str device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    :param str backend: ``auto`` (``nccl`` on CUDA, ``gloo`` on CPU), ``gloo`` or ``nccl``.
    :param env: the environment mapping (default ``os.environ``).
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    world_size = _env_int("WORLD_SIZE", env)
    rank = _env_int("RANK", env)
    local_rank = _env_int("LOCAL_RANK", env) if "LOCAL_RANK" in env else rank
    if world_size < 1:
        raise ConfigError(f"WORLD_SIZE must be >= 1, got {world_size}; launch with torchrun --nproc_per_node N")
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is outside 0..{world_size - 1} (WORLD_SIZE={world_size})")
    if local_rank < 0:
        raise ConfigError(f"LOCAL_RANK must be >= 0, got {local_rank}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown distributed backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
            "use --nproc_per_node <= the number of GPUs"
        )
    chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
    if chosen == "nccl" and not use_cuda:
        raise ConfigError("the nccl backend needs CUDA devices; use --dist-backend gloo (or auto) on CPU")
    if chosen == "nccl" and not dist.is_nccl_available():
        raise ConfigError("this torch build has no NCCL; use --dist-backend gloo")
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistributedContext(rank, local_rank, world_size, chosen, target)


def init(ctx: DistributedContext) -> None:
    """Join the process group described by ``ctx`` (idempotent)."""
    if dist.is_initialized():
        return
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(backend=ctx.backend, rank=ctx.rank, world_size=ctx.world_size)
    logger.info("rank %d of %d joined the %s process group on %s", ctx.rank, ctx.world_size, ctx.backend, ctx.device)


def shutdown() -> None:
    """Leave the process group, if one was joined. Call :func:`unwrap` on the model first.

    The DDP wrappers' reducers hold the process group, and they sit in reference cycles: left to the interpreter's
    final teardown, gloo's worker threads are destroyed while still joinable and the process aborts ("terminate called
    without an active exception", about one 2-process run in ten here). Collecting the cycles first makes
    ``destroy_process_group`` the group's last owner, so gloo shuts down while the interpreter is whole.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def wrap(vae: VAE, ctx: DistributedContext) -> VAE:
    """Route the forward passes of every submodule with trainable parameters through its own
    ``DistributedDataParallel``, so that the backward inside ``SVI.step`` averages gradients across ranks.

    DDP broadcasts rank 0's parameters at construction, so every replica starts from the same weights.
    """
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    for name in vae.routable:  # a learned prior is trained too; a labelled model adds its classifier
        module = getattr(vae, name)
        if any(p.requires_grad for p in module.parameters()):
            vae.route(**{name: DistributedDataParallel(module, device_ids=device_ids)})
    return vae


def noise_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of rank ``rank``'s noise stream from global step ``step`` on: distinct per rank, a pure function of
    (seed, rank, step). A resumed distributed run re-seeds each rank's stream at the resume step. Kept below 2**32,
    which :func:`pyro.set_rng_seed` (numpy's seeding) requires."""
    return derive_seed("noise", seed, rank, step) % 2**32


def reduce_moments(local: Moments) -> Moments:
    """The :class:`~pyro_vae.stats.Moments` of the union of every rank's values, from each rank's own (the values
    themselves outside a process group). Every rank must call it at the same point.

    Two all-reduces of float64 sums (Chan et al.'s pooling, :func:`pyro_vae.stats.pool`): first the counts and the
    sums n·mean, which give the global mean; then each rank's ``m2 + n·(mean − global mean)²``. No sum of squares
    is reduced, so a large mean does not cancel the spread. A rank with no values contributes nothing.
    """
    if not dist.is_initialized():
        return local
    has_values = local.count > 0
    total, count = sum_over_ranks(local.count * local.mean if has_values else 0.0, local.count)
    count = round(count)
    if count == 0:
        return Moments(0, float("nan"), 0.0)
    mean = total / count
    (m2,) = sum_over_ranks(local.m2 + local.count * (local.mean - mean) ** 2 if has_values else 0.0)
    return Moments(count, mean, m2)


def reduce_mean_se(values: torch.Tensor) -> MeanSE:
    """Mean and standard error over the union of every rank's ``values`` (e.g. per-image test ELBOs), in float64;
    the standard error is the sample standard deviation over √n (:mod:`pyro_vae.stats`)."""
    return reduce_moments(moments(values)).mean_se()


def combine_mean_se(part: MeanSE, n: int) -> MeanSE:
    """Combine each rank's mean ± SE over its ``n`` data points into the mean ± SE over all ranks' points; exact,
    as each rank's moments are recovered from its mean ± SE (:meth:`~pyro_vae.stats.Moments.from_mean_se`)."""
    return reduce_moments(Moments.from_mean_se(part, n)).mean_se()


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Each of ``values`` summed over every rank, all-reduced in float64 (the values themselves outside a process
    group). Every rank must call it at the same point."""
    if not dist.is_initialized():
        return tuple(float(v) for v in values)
    stats = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(stats)
    return tuple(stats.cpu().tolist())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. "a stop signal arrived"), so all ranks stop at the
    same step instead of one waiting forever in the next gradient all-reduce."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def unwrap(vae: VAE) -> VAE:
    """Remove the routes set by :func:`wrap`."""
    vae.route(prior=None, encoder=None, decoder=None, family=None, likelihood=None)
    return vae


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def session(config: RunConfig, *, env: Mapping[str, str] | None = None) -> Iterator[DistributedContext | None]:
    """The torchrun session of a run: join the process group when launched by torchrun, yield where this process
    stands (``None`` outside torchrun), and on exit leave the group, but only if this session created it.

    A process group that already existed on entry (one the caller made) is used as it is and left in place; its
    world size must match torchrun's environment.

    :param config: the run configuration (``train.device`` and ``train.dist_backend`` are read).
    :param env: the environment (default ``os.environ``), for :func:`context_from_env`.
    :raises ConfigError: for a malformed torchrun environment, or an existing group of another world size.
    """
    ctx = context_from_env(config.train.device, config.train.dist_backend, env)
    if ctx is None:
        yield None
        return
    created = not dist.is_initialized()
    if created:
        init(ctx)
    elif dist.get_world_size() != ctx.world_size:
        raise ConfigError(
            f"a process group of {dist.get_world_size()} processes already exists but WORLD_SIZE is "
            f"{ctx.world_size}; destroy it first or launch with torchrun --nproc_per_node {dist.get_world_size()}"
        )
    try:
        yield ctx
    finally:
        if created:
            shutdown()


@contextmanager
def ddp(vae: VAE, ctx: DistributedContext | None) -> Iterator[VAE]:
    """Route ``vae`` through ``DistributedDataParallel`` for the block (:func:`wrap`), and remove the routes on exit
    (:func:`unwrap`), also when the block raises. With ``ctx`` ``None`` (no torchrun) the VAE is left as it is.

    :param vae: the model.
    :param ctx: the session's context, from :func:`session`.
    """
    if ctx is None:
        yield vae
        return
    wrap(vae, ctx)
    try:
        yield vae
    finally:
        unwrap(vae)
