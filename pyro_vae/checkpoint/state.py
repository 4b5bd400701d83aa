"""The checkpoint payload as a typed record: :class:`TrainingState`.

Everything a bit-exact resume needs, and everything a reader needs to rebuild the model and find its data again. On
disk it is a dict of tensors and plain values (so that it loads with ``weights_only=True``)::

    run_id, config, versions, input_dim, image_shape, data{name, n_train, n_test, sha256, path},
    world_size, global_batch, model, optimizer, schedules, rng{torch, cuda}, progress{epoch, batch, step,
    recorded, seconds}, losses, records, metrics{offset, records}, callbacks

:meth:`TrainingState.from_payload` checks every field, so a crafted or damaged plain-data checkpoint is one
:class:`~pyro_vae.errors.CheckpointError` naming the file and the field, never a ``KeyError`` deep in a resume.
Version-2 files (before run ids) are converted: their run id is ``""`` (not recorded), their world size 1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro
import torch

from pyro_vae.config import RunConfig, check_float, check_int, resume_differences
from pyro_vae.data.fingerprint import DataRecord
from pyro_vae.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

#: Bytes of the CPU generator's state (``torch.get_rng_state()``): the Mersenne twister and its position.
_RNG_BYTES = torch.get_rng_state().numel()


class Progress(NamedTuple):
    """Where a run stands: the next batch is ``batch`` of ``epoch``; ``recorded`` says whether that epoch's record
    was already written (only after a ``max_steps`` stop in the middle of it); ``seconds`` is the time spent in it."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    recorded: bool = False
    seconds: float = 0.0


def _passes(check: Callable[..., Any], value: Any, **bounds: Any) -> bool:
    """Whether ``value`` passes ``check`` (:func:`check_int` or :func:`check_float`): a payload field is file content,
    not an argument, so its caller names the file and the field in a CheckpointError instead."""
    try:
        check("value", value, **bounds)
    except ConfigError:
        return False
    return True


def _is_int(value: Any, low: int = 0) -> bool:
    return _passes(check_int, value, low=low)


def _plain_dict(value: Any) -> str | None:
    return None if isinstance(value, dict) else f"is a {type(value).__name__}, not a dict"


def _check_config(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"is a {type(value).__name__}, not a dict"
    try:
        RunConfig.from_dict(value)
    except (ConfigError, TypeError, ValueError) as err:
        return f"is not a valid run config ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def _check_data(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"is a {type(value).__name__}, not a dict"
    if not isinstance(value.get("name"), str) or not _is_int(value.get("n_train"), 1):
        return "needs a str 'name' and an int 'n_train' >= 1"
    if not _is_int(value.get("n_test"), 0):
        return "needs an int 'n_test' >= 0"
    if not isinstance(value.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", value["sha256"]):
        return "needs 'sha256', a 64-digit hex fingerprint"
    if value.get("path") is not None and not isinstance(value["path"], str):
        return "has a 'path' that is neither a str nor None"
    if value.get("labels") is not None and not (
        isinstance(value["labels"], str) and re.fullmatch(r"[0-9a-f]{64}", value["labels"])
    ):
        return "has 'labels' that is neither None nor a 64-digit hex fingerprint"
    return None


def _check_rng(value: Any) -> str | None:
    if not isinstance(value, dict) or set(value) != {"torch", "cuda"}:
        return "must be a dict with exactly the keys 'torch' and 'cuda'"
    cpu = value["torch"]
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8 or cpu.shape != (_RNG_BYTES,):
        what = f"a {cpu.dtype} tensor of shape {tuple(cpu.shape)}" if isinstance(cpu, torch.Tensor) else repr(cpu)
        return f"'torch' must be a uint8 tensor of {_RNG_BYTES} bytes (a CPU generator state), got {what}"
    cuda = value["cuda"]
    if not isinstance(cuda, list) or any(not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 for t in cuda):
        return "'cuda' must be a list of uint8 tensors"
    return None


def _check_progress(value: Any) -> str | None:
    fields = set(Progress._fields)
    if not isinstance(value, dict) or set(value) != fields:
        return f"must be a dict with the keys {sorted(fields)}"
    if not all(_is_int(value[k]) for k in ("epoch", "batch", "step")) or not isinstance(value["recorded"], bool):
        return "needs ints epoch, batch, step >= 0 and a bool 'recorded'"
    seconds = value["seconds"]
    if not _passes(check_float, seconds, low=0.0):
        return f"has 'seconds' {seconds!r}, not a finite number >= 0"
    return None


def _check_tensors(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"is a {type(value).__name__}, not a state dict"
    bad = [k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    return f"holds non-tensor entries {bad[:3]}" if bad else None


def _check_losses(value: Any) -> str | None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float64 or value.ndim != 1:
        return "must be a 1-d float64 tensor of per-step losses"
    return None


def _check_records(value: Any) -> str | None:
    ok = isinstance(value, list) and all(isinstance(r, dict) for r in value)
    return None if ok else "must be a list of dicts (the epoch records)"


def _check_metrics(value: Any) -> str | None:
    ok = isinstance(value, dict) and _is_int(value.get("offset")) and _is_int(value.get("records"))
    return None if ok else "must be a dict with ints 'offset' and 'records' >= 0"


def _int_check(low: int):
    return lambda v: None if _is_int(v, low) else f"is {v!r}, not an int >= {low}"


#: One check per payload key: ``None`` when the value is fine, else what is wrong with it.
_CHECKS = {
    "run_id": lambda v: None if isinstance(v, str) else f"is {v!r}, not a str",
    "config": _check_config,
    "versions": _plain_dict,
    "input_dim": _int_check(1),
    "image_shape": lambda v: None,  # checked against input_dim below
    "data": _check_data,
    "world_size": _int_check(1),
    "global_batch": _int_check(1),
    "model": _check_tensors,
    "optimizer": _plain_dict,
    "schedules": _plain_dict,
    "rng": _check_rng,
    "progress": _check_progress,
    "losses": _check_losses,
    "records": _check_records,
    "metrics": _check_metrics,
    "callbacks": _plain_dict,
}


def _upgrade(payload: dict, source: str) -> dict:
    """A version-2 payload in the version-3 layout (run id not recorded, one process)."""
    version = payload.get("format_version")
    if version == 3:
        return payload
    if version != 2:
        raise CheckpointError(
            f"checkpoint {source} has format {version!r}, which this pyro_vae cannot resume or load (it reads 2 and 3)"
        )
    config = payload.get("config")
    batch = config.get("train", {}).get("batch_size", 128) if isinstance(config, dict) else 128
    data = payload.get("data")
    logger.info("checkpoint %s has format 2: reading it with run id unrecorded and world size 1", source)
    return {
        "run_id": "",
        "world_size": 1,
        "global_batch": batch,
        "callbacks": {},
        **payload,
        "data": {**data, "path": None} if isinstance(data, dict) else data,
    }


def _check_image_shape(shape: Any, input_dim: int) -> str | None:
    """``None``, ``[C, H, W]``, or the ``[H, W]`` of checkpoints written before colour images (one grey channel)."""
    if shape is None:
        return None
    if not isinstance(shape, list) or len(shape) not in (2, 3) or not all(_is_int(s, 1) for s in shape):
        return f"is {shape!r}, not None or a list [C, H, W] of positive ints"
    if math.prod(shape) != input_dim:
        return f"is {shape} ({math.prod(shape)} values) but input_dim is {input_dim}"
    return None


@dataclasses.dataclass
class TrainingState:
    """Everything a checkpoint holds: what a bit-exact resume restores and what a reader needs.

    :ivar str run_id: the run this state belongs to (``""``: not recorded, a version-2 file).
    :ivar dict config: the resolved ``RunConfig.to_dict()``.
    :ivar dict versions: package versions and thread count.
    :ivar int input_dim: D, values per image.
    :ivar image_shape: ``[C, H, W]`` whose product is ``input_dim`` (a legacy ``[H, W]`` file loads as ``[1, H, W]``);
        ``None`` for flat data.
    :ivar DataRecord data: name, sizes, fingerprint and absolute path of the data.
    :ivar int world_size: processes that trained (1 outside ``torchrun``).
    :ivar int global_batch: images per optimiser step over all processes.
    :ivar dict model: ``vae.state_dict()``.
    :ivar dict optimizer: the optimiser's state dict.
    :ivar dict schedules: stateful schedules' state dicts, by name.
    :ivar dict rng: ``{"torch": uint8 tensor, "cuda": [uint8 tensors]}``.
    :ivar Progress progress: where the run stands.
    :ivar torch.Tensor losses: float64 per-step losses, ``(steps,)``.
    :ivar list records: the epoch records as plain dicts.
    :ivar int metrics_offset: byte length of ``metrics.jsonl`` that matches this state.
    :ivar dict callbacks: plain state of callbacks, e.g. ``{"early_stopping": {...}}`` (default ``{}``).
    """

    run_id: str
    config: dict
    versions: dict
    input_dim: int
    image_shape: list[int] | None
    data: DataRecord
    world_size: int
    global_batch: int
    model: dict
    optimizer: dict
    schedules: dict
    rng: dict
    progress: Progress
    losses: torch.Tensor
    records: list[dict]
    metrics_offset: int
    callbacks: dict = dataclasses.field(default_factory=dict)

    def to_payload(self) -> dict:
        """The on-disk dict (plain values and tensors; ``format_version`` is added when it is written)."""
        payload = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        payload["image_shape"] = None if self.image_shape is None else [int(s) for s in self.image_shape]
        payload["data"] = dict(self.data._asdict())
        payload["progress"] = dict(self.progress._asdict())
        del payload["metrics_offset"]
        payload["metrics"] = {"offset": int(self.metrics_offset), "records": len(self.records)}
        return payload

    def differences(self, config: dict, world_size: int, fingerprint: str, data: DataRecord | None = None) -> list[str]:
        """What would change the result if this state were continued by a run with the resolved ``config``
        (``RunConfig.to_dict()``), ``world_size`` processes and data ``fingerprint``: the determinism-relevant
        config fields (:func:`~pyro_vae.config.resume_differences`), the world size and the data (and, given the
        run's :class:`~pyro_vae.data.DataRecord`, the labels a model with labels trains on), as
        ``["train.seed: 0 → 1", ...]``; empty when the run may resume."""
        out = resume_differences(self.config, config)
        if self.world_size != world_size:
            out.append(f"world size (processes): {self.world_size} → {world_size}")
        if self.data.sha256 != fingerprint:
            out.append(f"data fingerprint: {self.data.sha256[:12]}… → {fingerprint[:12]}…")
        if data is not None and self.data.labels != data.labels:
            before, after = (v[:12] + "…" if v else "none" for v in (self.data.labels, data.labels))
            out.append(f"labelled images or their labels: {before} → {after}")
        return out

    def load_weights(self, module: torch.nn.Module, *, source: object) -> None:
        """Load :attr:`model` into ``module``, or say in one line why the weights do not fit it.

        :raises CheckpointError: for missing, unexpected or differently shaped weights (another architecture, or a
            damaged or crafted file), naming ``source``.
        """
        expected = module.state_dict()
        missing, unexpected = sorted(set(expected) - set(self.model)), sorted(set(self.model) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {source}: its weights do not fit this model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}): another architecture, or a damaged file; start a new run with --out or --overwrite"
            )
        for key, value in expected.items():
            if self.model[key].shape != value.shape:
                raise CheckpointError(
                    f"checkpoint {source}: weight {key!r} has shape {tuple(self.model[key].shape)} but this model "
                    f"needs {tuple(value.shape)}: another architecture, or a damaged file; start a new run with --out "
                    "or --overwrite"
                )
        module.load_state_dict(self.model)

    @classmethod
    def from_payload(cls, payload: dict, *, source: str) -> TrainingState:
        """Check a loaded payload field by field and build the state.

        :param dict payload: what :func:`~pyro_vae.checkpoint.load_checkpoint` returned.
        :param str source: the file it came from, for messages.
        :raises CheckpointError: one line naming ``source`` and the first bad or missing field.
        """
        if not isinstance(payload, dict):
            raise CheckpointError(f"checkpoint {source} holds a {type(payload).__name__}, not a checkpoint dict")
        payload = _upgrade(payload, source)
        missing = [key for key in _CHECKS if key not in payload]
        if missing:
            raise CheckpointError(
                f"checkpoint {source} lacks the field(s) {', '.join(missing)}; it was not written by pyro_vae's fit "
                "or is damaged: resume from an older checkpoint or start a new run"
            )
        problems = [(key, check(payload[key])) for key, check in _CHECKS.items()]
        problems.append(("image_shape", _check_image_shape(payload["image_shape"], payload["input_dim"])))
        for key, problem in problems:
            if problem is not None:
                raise CheckpointError(f"checkpoint {source}: field {key!r} {problem}; the file is damaged or crafted")
        fields = {name: payload[name] for name in _CHECKS if name != "metrics"}
        if fields["image_shape"] is not None and len(fields["image_shape"]) == 2:
            fields["image_shape"] = [1, *fields["image_shape"]]  # a grey [H, W] from before colour images
        fields["data"] = DataRecord(**{k: payload["data"].get(k) for k in DataRecord._fields})
        fields["progress"] = Progress(**payload["progress"])
        return cls(**fields, metrics_offset=payload["metrics"]["offset"])


def environment_info() -> dict:
    """Versions and thread count, recorded with every run."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("pyro_vae")
    except PackageNotFoundError:
        pkg_version = "unknown"
    return {
        "pyro_vae": pkg_version,
        "pyro": pyro.__version__,
        "torch": str(torch.__version__),  # a TorchVersion, which weights_only loads refuse
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def capture_rng(device: torch.device) -> dict:
    """The torch RNG states a bit-exact resume restores (CPU, and every CUDA device's when training on CUDA)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def restore_rng(rng: dict, device: torch.device) -> None:
    """Restore :func:`capture_rng`'s states; CUDA states only where this machine has the same number of GPUs."""
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    elif device.type == "cuda":
        logger.warning("the checkpoint holds no CUDA RNG state for this machine's GPUs; the noise will differ")
