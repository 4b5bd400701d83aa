"""``pyro-vae sample``: draw from a trained run's prior and decoder, and save a grid or the arrays.

The codes come from the model itself (its ``"z"`` site, run with the observation unconditioned), so a learned prior
is sampled as the model defines it; the images are the decoder means E[x | z] or, with ``draws``, one draw
x ~ p(x | z) per code. A model with labels (``--model cvae|m2``) decodes p(x | z, y): every image of class
``--label K``, or by default balanced over the classes (image i of class i mod C); its codes come from its prior
module, which y does not enter. Files are written atomically: inside the run directory through
:meth:`pyro_vae.run_dir.RunDir.write_bytes` (readers take no lock, so a run that is training is not disturbed),
elsewhere with :func:`pyro_vae.checkpoint.files.atomic_write`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pyro_vae.config import check_int
from pyro_vae.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from pyro_vae.model import VAE

__all__ = ["FORMATS", "Samples", "check_label", "draw_samples", "sample_bytes", "sample_target"]

#: The file formats of ``pyro-vae sample --format``.
FORMATS = ("png", "npy", "npz")


class Samples(NamedTuple):
    """What ``sample`` drew.

    :ivar z: ``(n, L)`` codes drawn from the model's prior.
    :ivar x: ``(n, D)`` images: the decoder means E[x | z], or draws x ~ p(x | z) when ``draws``.
    :ivar draws: whether ``x`` holds draws rather than means.
    :ivar y: ``(n,)`` the class of each image, for a model with labels; ``None`` for the VAE.
    :ivar label: the class every image was drawn at (``--label``), or ``None``.
    """

    z: torch.Tensor
    x: torch.Tensor
    draws: bool
    y: torch.Tensor | None = None
    label: int | None = None

    def title(self) -> str:
        """What the images are, for the figure's title."""
        if self.y is None:
            return "draws x ~ p(x|z), z ~ p(z)" if self.draws else "decoder means E[x|z], z ~ p(z)"
        what = "draws x ~ p(x|z,y)" if self.draws else "decoder means E[x|z,y]"
        return f"{what}, z ~ p(z), " + ("y balanced over the classes" if self.label is None else f"y = {self.label}")


def check_label(label: int | None, kind: str, num_classes: int | None) -> None:
    """Refuse ``--label`` for a run that has no classes, or out of ``0..C-1``: one line, before the run loads.

    :param label: the ``--label`` given (``None``: not given, nothing to check).
    :param str kind: the run's ``--model``.
    :param num_classes: the run's number of classes (``config.model.num_classes``).
    """
    if label is None:
        return
    if kind == "vae" or num_classes is None:
        raise ConfigError(f"--label chooses the class of a --model cvae or m2 run; this run is a {kind}: leave it out")
    check_int("--label", label, low=0, high=num_classes - 1, why=f"the run's model has {num_classes} classes")


def draw_samples(vae: VAE, n: int, *, seed: int = 0, draws: bool = False, label: int | None = None) -> Samples:
    """``n`` codes from the model's prior and their images; seeded by ``seed`` (for the VAE Pyro's global seed is
    set). A model with labels draws every image at class ``label`` (default ``None``: balanced over the classes),
    as :func:`pyro_vae.plotting.generative.labelled_samples` does; the VAE refuses a label.

    The model runs once on a placeholder batch with its observation unconditioned, so ``z`` comes from whatever
    prior the model samples (not a hard-coded N(0, I)); the images are the likelihood's mean (``likelihood.mean``,
    as in the training figures) or a draw from it.
    """
    import pyro
    import torch
    from pyro import poutine

    from pyro_vae.networks import eval_mode

    check_label(label, vae.kind, getattr(vae, "num_classes", None))
    if getattr(vae, "num_classes", None) is not None:
        from pyro_vae.plotting.generative import labelled_samples  # the figures' draws, so both show the same

        with eval_mode(vae):
            drawn = labelled_samples(vae, n, seed, draws, label)
        return Samples(drawn.z.cpu(), drawn.x.cpu(), draws, drawn.y.cpu(), label)
    ref = next(vae.parameters())
    pyro.set_rng_seed(seed)
    with torch.no_grad(), eval_mode(vae):
        placeholder = ref.new_zeros(n, vae.input_dim)  # (n, D): only its shape is read once x is unconditioned
        trace = poutine.trace(poutine.uncondition(vae.model)).get_trace(placeholder)
        z = trace.nodes["z"]["value"]  # (n, L)
        raw = vae.decoder(z)  # (n, D * params_per_dim)
        x = vae.likelihood(raw).sample() if draws else vae.likelihood.mean(raw)  # (n, D)
    return Samples(z.detach().cpu(), x.detach().cpu(), draws)


def _image_array(x, image_shape: Sequence[int] | None):
    """``(n, C, H, W)`` for images (a legacy ``(H, W)`` shape has one channel), ``(n, D)`` otherwise."""
    array = x.numpy()
    if not image_shape:
        return array
    shape = tuple(image_shape) if len(image_shape) == 3 else (1, *tuple(image_shape)[-2:])
    return array.reshape(array.shape[0], *shape)


def sample_bytes(samples: Samples, image_shape: Sequence[int] | None, fmt: str) -> bytes:
    """The file content: a PNG grid titled with what the images are, ``.npy`` of the images, or ``.npz`` holding
    ``x`` (the images), ``z`` (the codes), ``draws`` and, for a model with labels, ``y`` (the classes)."""
    import numpy as np

    buffer = io.BytesIO()
    if fmt == "png":
        from pyro_vae.plotting import image_grid

        n = samples.x.shape[0]
        fig = image_grid(samples.x, image_shape, ncols=math.ceil(math.sqrt(n)), title=samples.title())
        fig.savefig(buffer, format="png", dpi=100)
    elif fmt == "npy":
        np.save(buffer, _image_array(samples.x, image_shape))
    else:
        arrays = {"x": _image_array(samples.x, image_shape), "z": samples.z.numpy(), "draws": np.bool_(samples.draws)}
        if samples.y is not None:
            arrays["y"] = samples.y.numpy()  # the class of each image
        np.savez(buffer, **arrays)
    return buffer.getvalue()


def _format_of(out: Path | None, fmt: str | None) -> str:
    suffix = out.suffix.lower().lstrip(".") if out is not None else ""
    if out is not None and suffix not in FORMATS:
        raise ConfigError(
            f"--out {out} ends in {out.suffix or 'no suffix'}; sample writes .png, .npy or .npz files: "
            f"name the file {out.with_suffix('.' + (fmt or 'png')).name}"
        )
    if fmt is not None and out is not None and suffix != fmt:
        raise ConfigError(
            f"--out {out} is a .{suffix} file but --format is {fmt}; pass one of them, or make them agree"
        )
    return fmt or suffix or "png"


def sample_target(run_dir: Path, out: Path | None, fmt: str | None, n: int, overwrite: bool) -> tuple[Path, str]:
    """``(file to write, format)``, checked before the run is loaded.

    Without ``out`` the file is ``RUN/samples-N.<format>``, and when that exists the next free
    ``samples-N-2.<format>``, ``-3``, ...: sampling again never replaces earlier samples. A named ``out`` that
    exists is replaced only with ``overwrite``. The format comes from ``fmt``, else from the suffix of ``out``, else
    PNG.
    """
    fmt = _format_of(out, fmt)
    if out is None:
        run = run_dir.parent if run_dir.is_file() else run_dir
        if not run.is_dir():
            raise ConfigError(f"{run_dir} is no run directory or checkpoint file; pass a directory written by 'train'")
        out = run / f"samples-{n}.{fmt}"
        copy = 2
        while out.exists():
            out, copy = run / f"samples-{n}-{copy}.{fmt}", copy + 1
        return out, fmt
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; name a file, e.g. {out / f'samples-{n}.{fmt}'}")
    if not out.parent.is_dir():
        raise ConfigError(f"the directory of --out {out} does not exist; create it or choose another path")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it, or leave out --out for a new file")
    return out, fmt


def write_samples(run_path: Path, out: Path, data: bytes) -> Path:
    """Write ``data`` to ``out`` atomically, through the run directory's writer when ``out`` is in it."""
    if out.parent.resolve() == run_path.resolve():
        from pyro_vae.run_dir import RunDir

        return RunDir(run_path).write_bytes(out.name, data)
    from pyro_vae.checkpoint.files import atomic_write

    atomic_write(out, data)
    return out
