"""The argument parser of ``pyro-vae``: the config flags come from :mod:`pyro_vae.cli.flags`, the rest is each
command's own."""

from __future__ import annotations

import argparse
from pathlib import Path

from pyro_vae.cli import commands
from pyro_vae.cli.flags import (
    PROG,
    Parser,
    add_config_flags,
    field_type,
    int_type,
    registry_epilog,
)
from pyro_vae.config import SECTIONS, ModelConfig, TrainConfig
from pyro_vae.errors import unknown_choice

#: The families ``pyro-vae compare`` trains when ``--guides`` is not given.
DEFAULT_COMPARE_GUIDES = "mvn_diag,diag_normal,full_rank,low_rank:4,iaf:2,sylvester:4"
#: What the help of ``compare`` says about its time.
_COMPARE_TIME = (
    "Every value is trained with every seed under the same data order, seeds and budget, from shared initial\n"
    "weights where the shapes allow. Time: on a CPU the IS-NLL of each run (--nll-k particles per test image,\n"
    "1000 by default) usually costs more than its training; --nll-k 0 skips it, --nll-images N bounds it.\n"
    "Timings taken while the machine's load exceeds its CPUs are marked '*' in the table."
)
#: Flags of evaluate that size a pass: particles x images are held in memory at once.
_MEMORY = "particles x images are held in memory at once"


def _guide_list(value: str) -> list[str]:
    """``--guides V1,V2,...``: each spec checked as ``--guide`` checks it (close-match hints, spec options)."""
    guides = [g.strip() for g in value.split(",")]
    if not all(guides):
        raise argparse.ArgumentTypeError(f"expected comma-separated guide families, got {value!r}")
    parse = field_type(ModelConfig, "guide")
    return [parse(guide) for guide in guides]


def _int_list(value: str) -> tuple[int, ...]:
    check = int_type("every k of --k", high=2**20, why=_MEMORY)
    return tuple(check(v) for v in value.split(","))


def _vary(text: str):
    """``FIELD=V1,V2,...`` checked at once: the field against the options a comparison can vary (close-match hint),
    each value as the field's own flag checks it; returns ``(field, values)``."""
    from pyro_vae.compare_checks import KIND_NOT_VARIED, vary_fields  # imports torch: only when --vary is given

    field, sep, values = text.partition("=")
    field = field.strip().replace("-", "_")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"expected FIELD=V1,V2,..., e.g. likelihood=bernoulli,continuous_bernoulli; got {text!r}"
        )
    if field in ("model", "kind"):
        raise argparse.ArgumentTypeError(KIND_NOT_VARIED)
    fields = vary_fields()
    if field not in fields:
        raise argparse.ArgumentTypeError(str(unknown_choice("option to vary", field, fields)))
    parse = field_type(SECTIONS[fields[field]], field)
    items = [v.strip() for v in values.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated values of {field}, got {values!r}")
    return field, [parse(v) for v in items]


def _sub(sub, name: str, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose help ends with every registry's names."""
    return sub.add_parser(
        name,
        help=help_text,
        description=description or help_text,
        epilog=registry_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_train(sub) -> None:
    train = _sub(sub, "train", "train a VAE and write a run directory")
    add_config_flags(train)
    train.add_argument(
        "--out", type=Path, help="run directory (default runs/<guide>-<time>, runs/<model>-<guide>-<time>)"
    )
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
    evaluate = _sub(sub, "evaluate", "evaluate a trained run on its test split (progress per chunk)")
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


def _format(text: str) -> str:
    from pyro_vae.cli.sampling import FORMATS

    if text not in FORMATS:
        raise argparse.ArgumentTypeError(str(unknown_choice("format", text, FORMATS)))
    return text


def _add_sample(sub) -> None:
    sample = _sub(sub, "sample", "draw images from a trained run's prior and decoder (by class for cvae/m2)")
    sample.add_argument("run_dir", type=Path, help="a directory written by 'pyro-vae train' (it may be training)")
    sample.add_argument(
        "--n", type=int_type("--n", high=4096, why="one grid image"), default=64, help="number of samples (default 64)"
    )
    sample.add_argument("--seed", type=field_type(TrainConfig, "seed"), default=0, help="seed of the prior draws")
    sample.add_argument(
        "--out",
        type=Path,
        help="file to write (default RUN/samples-N.FORMAT; when that exists, the next free RUN/samples-N-2.FORMAT, "
        "-3, ...: earlier samples are never replaced); a named file that exists is refused unless --overwrite",
    )
    sample.add_argument("--overwrite", action="store_true", help="replace the file named by --out")
    sample.add_argument(
        "--format",
        type=_format,
        metavar="png|npy|npz",
        help="png: a grid; npy: the images as an array (n, C, H, W), or (n, D) without an image shape; npz: the "
        "images as x, the latent codes as z, and draws (default: the suffix of --out, else png)",
    )
    sample.add_argument(
        "--draws",
        action="store_true",
        help="draw x ~ p(x|z) for each code instead of the decoder mean E[x|z] (the figure's title says which)",
    )
    sample.add_argument(
        "--label",
        type=int_type("--label", low=0),
        metavar="K",
        help="--model cvae/m2 runs: every sample of class K (0..C-1); default balanced over the classes",
    )
    sample.set_defaults(run=commands.cmd_sample)


#: The figures of ``pyro-vae plot --kind`` (those of :data:`pyro_vae.plotting.PLOT_KINDS`; a test keeps them equal,
#: since this module must not import matplotlib).
PLOT_KINDS = ("reconstructions", "samples", "latent", "traversal", "interpolation", "classes")
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
        "row), interpolation (between two test images; of one class for --model cvae/m2), classes (--model cvae/m2: "
        "one row of samples per class)",
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
        help="test images (reconstructions 8, latent 2000), samples (64), rows (traversal 8), steps "
        "(interpolation 10) or samples per class (classes 8)",
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
    compare = _sub(
        sub,
        "compare",
        "train with each value of one option (guide, likelihood, objective, ...) under one protocol and tabulate",
        description=_COMPARE_TIME,
    )
    varied = compare.add_mutually_exclusive_group()
    varied.add_argument(
        "--vary",
        type=_vary,
        metavar="FIELD=V1,V2,...",
        help="the option to vary and its values, e.g. likelihood=bernoulli,continuous_bernoulli or "
        "objective=trace,iwae:5; FIELD is one of guide, prior, likelihood, network, objective (those this version "
        f"has); default guide={DEFAULT_COMPARE_GUIDES}",
    )
    varied.add_argument(
        "--guides",
        type=_guide_list,
        metavar="V1,V2,...",
        help="comma-separated family specs: the same as --vary guide=V1,V2,...",
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
        "--nll-k",
        type=int_type("--nll-k", low=0),
        default=1000,
        help="particles of each run's IS-NLL (default 1000; 0 skips it, which on a CPU usually saves most of the time)",
    )
    compare.add_argument(
        "--nll-images", type=int_type("--nll-images"), help="IS-NLL on the first N test images (default: all)"
    )
    compare.set_defaults(run=commands.cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-vae`` parser; its errors are one line ``pyro-vae: error: ...`` and exit 2."""
    parser = Parser(
        prog=PROG,
        description="Pyro variational autoencoders with swappable guide families.",
        epilog=registry_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for add in (_add_train, _add_evaluate, _add_sample, _add_compare, _add_plot):
        add(sub)
    return parser


__all__ = ["DEFAULT_COMPARE_GUIDES", "PLOT_KINDS", "build_parser"]
