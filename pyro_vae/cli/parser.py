"""The argument parser of ``pyro-vae``: the config flags come from :mod:`pyro_vae.cli.flags`, the rest is each
command's own."""

from __future__ import annotations

import argparse
from pathlib import Path

from pyro_vae.cli import commands
from pyro_vae.cli.flags import GUIDE_CHOICES, PROG, Parser, add_config_flags, field_type, int_type
from pyro_vae.config import TrainConfig
from pyro_vae.errors import unknown_choice

#: The families ``pyro-vae compare`` trains when ``--guides`` is not given.
DEFAULT_COMPARE_GUIDES = "mvn_diag,diag_normal,full_rank,low_rank:4,iaf:2,sylvester:4"
#: Flags of evaluate that size a pass: particles x images are held in memory at once.
_MEMORY = "particles x images are held in memory at once"


def _guide_list(value: str) -> list[str]:
    guides = [g.strip() for g in value.split(",")]
    if not all(guides):
        raise argparse.ArgumentTypeError(f"expected comma-separated guide families, got {value!r}")
    for guide in guides:
        if guide.partition(":")[0] not in GUIDE_CHOICES:
            raise argparse.ArgumentTypeError(
                str(unknown_choice("guide family", guide.partition(":")[0], GUIDE_CHOICES))
            )
    return guides


def _int_list(value: str) -> tuple[int, ...]:
    check = int_type("every k of --k", high=2**20, why=_MEMORY)
    return tuple(check(v) for v in value.split(","))


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="train a VAE and write a run directory")
    add_config_flags(train)
    train.add_argument("--out", type=Path, help="run directory (default runs/<guide>-<time>)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run in DIR from its newest checkpoint (or from a checkpoint file DIR/last.prev.pt); "
        "its settings are reused, and flags may change only the fields a resume leaves free "
        "(epochs, max-steps, the checkpoint, non-finite, progress, TensorBoard, early-stop and compile options)",
    )
    train.add_argument(
        "--force-resume", action="store_true", help="resume even though seed, batch size, data, model, ... changed"
    )
    train.add_argument("--no-figures", action="store_true", help="do not write PNG figures")
    train.set_defaults(run=commands.cmd_train)


def _add_evaluate(sub) -> None:
    evaluate = sub.add_parser("evaluate", help="evaluate a trained run on its test split")
    evaluate.add_argument("run_dir", type=Path, help="a directory written by 'pyro-vae train'")
    evaluate.add_argument(
        "--k", type=_int_list, default=(1, 100, 1000), help="particles per IW bound of log p(x) (default 1,100,1000)"
    )
    evaluate.add_argument("--n", type=int_type("--n"), help="use only the first N test images (default: all)")
    evaluate.add_argument("--gaps", action="store_true", help="also measure the approximation and amortisation gaps")
    evaluate.add_argument("--gap-images", type=int_type("--gap-images"), default=500, help="images for --gaps")
    evaluate.add_argument("--gap-steps", type=int_type("--gap-steps"), default=100, help="refinement steps")
    evaluate.add_argument(
        "--chunk-size",
        type=int_type("--chunk-size", high=2**20, why=_MEMORY),
        default=4096,
        help="particles x images per pass (bounds memory; default 4096)",
    )
    evaluate.add_argument(
        "--seed", type=field_type(TrainConfig, "seed"), default=0, help="seed of the evaluation noise"
    )
    evaluate.add_argument("--threads", type=field_type(TrainConfig, "threads"), help="torch CPU threads")
    evaluate.add_argument("--out", type=Path, help="JSON file to write (default DIR/eval.json)")
    evaluate.set_defaults(run=commands.cmd_evaluate)


def _add_sample(sub) -> None:
    sample = sub.add_parser("sample", help="draw images from a trained run's prior and decoder")
    sample.add_argument("run_dir", type=Path, help="a directory written by 'pyro-vae train'")
    sample.add_argument(
        "--n", type=int_type("--n", high=4096, why="one grid image"), default=64, help="number of samples (default 64)"
    )
    sample.add_argument("--seed", type=field_type(TrainConfig, "seed"), default=0, help="seed of the prior draws")
    sample.add_argument("--out", type=Path, required=True, help="PNG file to write")
    sample.set_defaults(run=commands.cmd_sample)


#: The figures of ``pyro-vae plot --kind`` (those of :data:`pyro_vae.plotting.PLOT_KINDS`; a test keeps them equal,
#: since this module must not import matplotlib).
PLOT_KINDS = ("reconstructions", "samples", "latent", "traversal", "interpolation")
#: Suffixes ``pyro-vae plot --out`` can write (matplotlib picks the format from the suffix).
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _plot_kind(value: str) -> str:
    if value not in PLOT_KINDS:
        raise argparse.ArgumentTypeError(str(unknown_choice("plot kind", value, PLOT_KINDS)))
    return value


def _add_plot(sub) -> None:
    plot = sub.add_parser("plot", help="draw one figure of a trained run (reads it without taking its lock)")
    plot.add_argument("run_dir", type=Path, help="a directory written by 'pyro-vae train'")
    plot.add_argument(
        "--kind",
        type=_plot_kind,
        required=True,
        help="reconstructions (original, binarised model input, reconstruction), samples (from the prior), latent "
        "(posterior means in the 2 most active dimensions), traversal (the most active dimensions varied one per "
        "row), interpolation (between two test images)",
    )
    plot.add_argument(
        "--out",
        type=Path,
        help=f"image file ({', '.join(PLOT_SUFFIXES)}); default RUN/plots/<kind>.png, replaced on each call (the "
        "figures training wrote into RUN are never touched)",
    )
    plot.add_argument(
        "--n",
        type=int_type("--n", high=100_000, why="one figure"),
        help="test images (reconstructions 8, latent 2000), samples (64), rows (traversal 8) or steps "
        "(interpolation 10)",
    )
    plot.add_argument(
        "--seed",
        type=field_type(TrainConfig, "seed"),
        default=0,
        help="seed of the prior draws (samples) or of the test images picked (traversal, interpolation)",
    )
    plot.add_argument("--draws", action="store_true", help="samples: draw x ~ p(x|z) instead of the mean E[x|z]")
    plot.set_defaults(run=commands.cmd_plot)


def _add_compare(sub) -> None:
    compare = sub.add_parser("compare", help="train several guide families under one protocol and tabulate")
    compare.add_argument(
        "--guides",
        type=_guide_list,
        default=DEFAULT_COMPARE_GUIDES,
        help=f"comma-separated family specs (default {DEFAULT_COMPARE_GUIDES})",
    )
    compare.add_argument(
        "--seeds", type=int_type("--seeds"), default=3, help="seeds 0..S-1 for every family (default 3)"
    )
    add_config_flags(compare, exclude=("guide", "seed"))
    compare.add_argument("--out", type=Path, help="output directory (default runs/compare-<time>)")
    compare.add_argument("--overwrite", action="store_true", help="replace a comparison already in --out")
    compare.add_argument("--no-figures", action="store_true", help="do not write compare.png")
    compare.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one fresh process per run, so peak memory is per run (default: on)",
    )
    compare.add_argument(
        "--nll-k", type=int_type("--nll-k", low=0), default=1000, help="particles of each run's IS-NLL (0: skip)"
    )
    compare.add_argument("--nll-images", type=int_type("--nll-images"), help="IS-NLL on the first N test images")
    compare.set_defaults(run=commands.cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-vae`` parser; its errors are one line ``pyro-vae: error: ...`` and exit 2."""
    parser = Parser(prog=PROG, description="Pyro variational autoencoders with swappable guide families.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for add in (_add_train, _add_evaluate, _add_sample, _add_compare, _add_plot):
        add(sub)
    return parser


__all__ = ["DEFAULT_COMPARE_GUIDES", "PLOT_KINDS", "build_parser"]
