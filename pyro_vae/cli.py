"""The ``pyro-vae`` command line: ``train``, ``evaluate``, ``sample`` and ``compare``.

Heavy imports (torch, Pyro, matplotlib) happen inside the commands, so ``pyro-vae --help`` answers at once. Usage
errors print one line on stderr and exit 2; runtime errors print one line and exit 1 (``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from pyro_vae.config import BINARIZATIONS, DATASETS, DEVICES, DIST_BACKENDS, NONFINITE_POLICIES, RunConfig
from pyro_vae.errors import ConfigError, PyroVAEError, unknown_choice

#: Registered guide families. Kept here, free of torch imports, so that ``--help`` is fast; a test checks that it
#: equals :func:`pyro_vae.guides.family_names`.
GUIDE_CHOICES = (
    "diag_normal",
    "full_rank",
    "householder",
    "iaf",
    "low_rank",
    "mvn_diag",
    "naf",
    "planar",
    "radial",
    "spline",
    "sylvester",
    "sylvester_householder",
    "sylvester_triangular",
)
#: Registered likelihoods (checked against :func:`pyro_vae.likelihoods.likelihood_names` by a test).
LIKELIHOOD_CHOICES = ("bernoulli", "continuous_bernoulli")
#: Registered objectives (checked against :func:`pyro_vae.objectives.objective_names` by a test).
OBJECTIVE_CHOICES = ("iwae", "meanfield", "trace")
#: Registered KL schedules (checked against :func:`pyro_vae.schedules.schedule_names` by a test).
KL_SCHEDULE_CHOICES = ("constant", "cyclical", "free_bits", "linear")

logger = logging.getLogger("pyro_vae.cli")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit 2), without the usage block."""

    def error(self, message: str):
        # argparse's "invalid choice" names the choices but not the closest one; add it, as unknown_choice does.
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            choices = re.findall(r"'([^']*)'", match.group(2))
            close = difflib.get_close_matches(match.group(1), choices, n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _choice_type(what: str, choices, *, spec: bool = False):
    def parse(value: str) -> str:
        base = value.partition(":")[0] if spec else value
        if base not in choices:
            raise argparse.ArgumentTypeError(str(unknown_choice(what, base, choices)))
        return value

    parse.__name__ = what
    return parse


#: The families ``pyro-vae compare`` trains when ``--guides`` is not given.
DEFAULT_COMPARE_GUIDES = "mvn_diag,diag_normal,full_rank,low_rank:4,iaf:2,sylvester:4"


def _guide_list(value: str) -> list[str]:
    guides = [g.strip() for g in value.split(",")]
    if not all(guides):
        raise argparse.ArgumentTypeError(f"expected comma-separated guide families, got {value!r}")
    check = _choice_type("guide family", GUIDE_CHOICES, spec=True)
    return [check(g) for g in guides]


def _int_list(value: str) -> tuple[int, ...]:
    message = f"expected comma-separated positive integers such as 1,100,1000, got {value!r}"
    try:
        numbers = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if not numbers or min(numbers) <= 0:
        raise argparse.ArgumentTypeError(message)
    return numbers


def _nonnegative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def _positive(kind):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {value!r}") from None
        if not number > 0 or number != number:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {value!r}")
        return number

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _add_run_flags(parser: argparse.ArgumentParser, *, every_run: bool) -> None:
    """The data, model and training flags that ``train`` and ``compare`` share (one copy, so the two cannot drift);
    ``every_run`` words the help for compare, where a flag applies to each of its runs."""
    each = ", for each run" if every_run else ""
    parser.add_argument("--config", type=Path, help="JSON run config (sections data/model/train); flags override it")
    parser.add_argument("--dataset", choices=DATASETS, help="data source (default: embedded, works offline)")
    parser.add_argument("--data", dest="data_path", help="your .npz file (x, optional y, x_test, y_test)")
    parser.add_argument("--data-dir", help="directory of Fashion-MNIST IDX files, or the MNIST download root")
    parser.add_argument("--latent-dim", type=_positive(int), help="latent dimension L (default 16)")
    parser.add_argument("--hidden-dims", help="comma-separated encoder widths (default 512,256,128,64)")
    parser.add_argument("--likelihood", type=_choice_type("likelihood", LIKELIHOOD_CHOICES), help="p(x|z)")
    parser.add_argument("--binarize", choices=BINARIZATIONS, help="binarisation protocol (default dynamic)")
    parser.add_argument(
        "--objective",
        type=_choice_type("objective", OBJECTIVE_CHOICES, spec=True),
        help="ELBO estimator: trace, meanfield, name:K for K particles, or iwae:K[:reparam|stl|dreg] (default trace)",
    )
    parser.add_argument("--particles", type=_positive(int), help="samples of z per image per step")
    parser.add_argument("--epochs", type=_positive(int), help="passes over the training data (default 20)")
    parser.add_argument("--batch-size", type=_positive(int), help="images per step (default 128)")
    parser.add_argument("--lr", type=_positive(float), help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--clip-norm", type=_positive(float), help="clip the gradient norm")
    parser.add_argument("--device", choices=DEVICES, help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--threads", type=_positive(int), help=f"torch CPU threads{each}")
    parser.add_argument("--max-steps", type=_positive(int), help=f"stop after this many steps{each}")
    parser.add_argument("--n-train", type=_positive(int), help="use only the first N training images")
    parser.add_argument("--n-test", type=_positive(int), help="use only the first N test images")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyro-vae", description="Pyro variational autoencoders with swappable guide families.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    train = sub.add_parser("train", help="train a VAE and write a run directory")
    train.add_argument("--guide", type=_choice_type("guide family", GUIDE_CHOICES, spec=True), help="guide family")
    train.add_argument(
        "--kl-schedule",
        type=_choice_type("KL schedule", KL_SCHEDULE_CHOICES, spec=True),
        help="KL weight over training: constant:BETA, linear:STEPS, cyclical:PERIOD[:RATIO], free_bits:NATS",
    )
    train.add_argument("--seed", type=int, help="seed of weights, data order and noise (default 0)")
    _add_run_flags(train, every_run=False)
    train.add_argument("--out", type=Path, help="run directory (default runs/<guide>-<time>)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run in DIR from its newest checkpoint (or from a checkpoint file DIR/last.prev.pt); "
        "its settings are reused, and flags may change only epochs, max-steps and the checkpoint/non-finite options",
    )
    train.add_argument(
        "--force-resume", action="store_true", help="resume even though seed, batch size, data, model, ... changed"
    )
    train.add_argument("--checkpoint-every", type=_positive(int), metavar="N", help="also checkpoint every N steps")
    train.add_argument("--keep-last", type=_positive(int), metavar="K", help="checkpoints to keep (default 2)")
    train.add_argument(
        "--on-nonfinite",
        choices=NONFINITE_POLICIES,
        help="on a NaN/inf loss or gradient: raise (default) or skip the batch",
    )
    train.add_argument("--max-skips", type=int, metavar="N", help="with --on-nonfinite skip: most batches skipped")
    train.add_argument(
        "--dist-backend", choices=DIST_BACKENDS, help="under torchrun: auto (nccl on CUDA, gloo on CPU), gloo or nccl"
    )
    train.add_argument("--no-figures", action="store_true", help="do not write PNG figures")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bar (default: on a TTY)")
    train.set_defaults(run=cmd_train)

    evaluate = sub.add_parser("evaluate", help="evaluate a trained run on its test split")
    evaluate.add_argument("run_dir", type=Path, help="a directory written by 'pyro-vae train'")
    evaluate.add_argument(
        "--k", type=_int_list, default=(1, 100, 1000), help="particles per IW bound of log p(x) (default 1,100,1000)"
    )
    evaluate.add_argument("--n", type=_positive(int), help="use only the first N test images (default: all)")
    evaluate.add_argument("--gaps", action="store_true", help="also measure the approximation and amortisation gaps")
    evaluate.add_argument("--gap-images", type=_positive(int), default=500, help="images for --gaps (default 500)")
    evaluate.add_argument("--gap-steps", type=_positive(int), default=100, help="refinement steps (default 100)")
    evaluate.add_argument(
        "--chunk-size", type=_positive(int), default=4096, help="particles x images per pass (bounds memory)"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise")
    evaluate.add_argument("--threads", type=_positive(int), help="torch CPU threads")
    evaluate.add_argument("--out", type=Path, help="JSON file to write (default DIR/eval.json)")
    evaluate.set_defaults(run=cmd_evaluate)

    sample = sub.add_parser("sample", help="draw images from a trained run's prior and decoder")
    sample.add_argument("run_dir", type=Path, help="a directory written by 'pyro-vae train'")
    sample.add_argument("--n", type=_positive(int), default=64, help="number of samples (default 64)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the prior draws")
    sample.add_argument("--out", type=Path, required=True, help="PNG file to write")
    sample.set_defaults(run=cmd_sample)

    compare = sub.add_parser("compare", help="train several guide families under one protocol and tabulate")
    compare.add_argument(
        "--guides",
        type=_guide_list,
        default=DEFAULT_COMPARE_GUIDES,
        help=f"comma-separated family specs (default {DEFAULT_COMPARE_GUIDES})",
    )
    compare.add_argument("--seeds", type=_positive(int), default=3, help="seeds 0..S-1 for every family (default 3)")
    _add_run_flags(compare, every_run=True)
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
        "--nll-k", type=_nonnegative_int, default=1000, help="particles of each run's IS-NLL (default 1000; 0: skip)"
    )
    compare.add_argument("--nll-images", type=_positive(int), help="IS-NLL on the first N test images (default: all)")
    compare.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bars")
    compare.set_defaults(run=cmd_compare, guide=None, seed=None)
    return parser


# --------------------------------------------------------------------------------------------------------------
def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The run config: ``base`` (default: the defaults) with the ``--config`` file and then every given flag applied on
    top. With a ``base`` (a resumed run's config), the file changes only the keys it names."""
    config = base or RunConfig()
    if args.config is not None:
        try:
            text = args.config.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {args.config}: {err.strerror}") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {args.config} is not valid JSON: {err}") from None
        if base is not None and isinstance(raw, dict):
            merged = base.to_dict()
            for section, values in raw.items():
                merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
            raw = merged
        config = RunConfig.from_dict(raw)
    data, model, train = {}, {}, {}
    if args.data_path is not None:
        if args.dataset not in (None, "npz"):
            raise ConfigError(f"--data FILE.npz implies --dataset npz, but --dataset {args.dataset} was given")
        data["path"] = args.data_path
        data["dataset"] = "npz"
    for key, section, field in (
        ("dataset", data, "dataset"),
        ("data_dir", data, "data_dir"),
        ("binarize", data, "binarize"),
        ("n_train", data, "n_train"),
        ("n_test", data, "n_test"),
        ("guide", model, "guide"),
        ("latent_dim", model, "latent_dim"),
        ("likelihood", model, "likelihood"),
        ("objective", train, "objective"),
        ("kl_schedule", train, "kl_schedule"),
        ("particles", train, "num_particles"),
        ("epochs", train, "epochs"),
        ("batch_size", train, "batch_size"),
        ("lr", train, "lr"),
        ("clip_norm", train, "clip_norm"),
        ("seed", train, "seed"),
        ("device", train, "device"),
        ("threads", train, "threads"),
        ("max_steps", train, "max_steps"),
        ("progress", train, "progress"),
        ("checkpoint_every", train, "checkpoint_every"),
        ("keep_last", train, "keep_last"),
        ("on_nonfinite", train, "on_nonfinite"),
        ("max_skips", train, "max_skips"),
        ("dist_backend", train, "dist_backend"),
    ):
        value = getattr(args, key, None)
        if value is not None:
            section[field] = value
    if args.hidden_dims is not None:
        try:
            model["hidden_dims"] = tuple(int(w) for w in args.hidden_dims.split(","))
        except ValueError:
            raise ConfigError(f"--hidden-dims must be comma-separated integers, got {args.hidden_dims!r}") from None
    return config.replace(data=data, model=model, train=train)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if any(part == ".." for part in out.parts) or "\0" in str(out):
        raise ConfigError(f"--out {str(out)!r} must not contain '..' or NUL")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if (out / "config.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a run; pass --overwrite to replace it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create run directory {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"run directory {out} is not writable; choose another --out")


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ or "RANK" in os.environ


def _torchrun_rank() -> int:
    """This process's rank under torchrun (0 outside it); a malformed RANK is reported by fit's own check."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _check_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse a bad or occupied ``--out`` before anything is loaded; :func:`pyro_vae.train.fit` creates it, after the
    data have been validated, so that a bad input leaves nothing behind."""
    if any(part == ".." for part in out.parts) or "\0" in str(out):
        raise ConfigError(f"--out {str(out)!r} must not contain '..' or NUL; give the run directory plainly")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; choose another --out")
    if out.is_dir() and not overwrite and ((out / "config.json").exists() or any(out.glob("last*.pt"))):
        raise ConfigError(
            f"{out} already holds a run; pass --resume {out} to continue it, --overwrite to replace it, "
            "or choose another --out"
        )


def _resume_target(args: argparse.Namespace) -> tuple[Path, Path, RunConfig]:
    """``(run directory, checkpoint, saved config)`` for ``--resume DIR`` or ``--resume DIR/last.prev.pt``."""
    from pyro_vae.checkpoint import CheckpointDir, load_checkpoint

    target = args.resume
    if args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it; pass one of them")
    if target.is_dir():
        run_dir, checkpoint = target, CheckpointDir(target).latest()
        if checkpoint is None:
            raise ConfigError(
                f"--resume {target}: the directory holds no checkpoint; start the run with --out {target} --overwrite"
            )
    elif target.is_file():
        run_dir, checkpoint = target.parent, target
    else:
        raise ConfigError(f"--resume {target}: no such run directory or checkpoint file")
    if args.out is not None and args.out.resolve() != run_dir.resolve():
        raise ConfigError(f"--resume continues the run in {run_dir}; leave out --out {args.out}")
    return run_dir, checkpoint, RunConfig.from_dict(load_checkpoint(checkpoint)["config"])


def cmd_train(args: argparse.Namespace) -> int:
    resume = None
    if args.resume is not None:
        out, resume, saved = _resume_target(args)
        config = config_from_args(args, base=saved)
    else:
        if args.force_resume:
            raise ConfigError("--force-resume only applies with --resume DIR")
        config = config_from_args(args)
        if args.out is None and _under_torchrun():
            raise ConfigError("under torchrun pass --out DIR: every process must name the same run directory")
        if args.out is None:
            from pyro_vae.checkpoint import safe_name

            # The guide spec's options come from the user ("low_rank:../x" passes the family check): keep the derived
            # name a plain component of runs/.
            name = f"{config.model.guide.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
            out = Path("runs") / safe_name(name.replace("/", "-"), what="run name")
        else:
            out = args.out
        if _torchrun_rank() == 0:  # the other ranks would find rank 0's fresh files; only rank 0 writes anyway
            _check_run_dir(out, args.overwrite)

    import pyro
    import torch

    from pyro_vae.data import load_dataset
    from pyro_vae.model import VAE
    from pyro_vae.train import TrainingInterrupted, fit

    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    data = load_dataset(config.data)
    pyro.set_rng_seed(config.train.seed)
    vae = VAE.from_config(config.model, data.input_dim)
    logger.info(
        "training %s (L=%d) on %s: %d train / %d test images, %d epochs of batch %d",
        config.model.guide,
        config.model.latent_dim,
        data.name,
        data.x_train.shape[0],
        data.x_test.shape[0],
        config.train.epochs,
        config.train.batch_size,
    )
    start = time.perf_counter()
    try:
        result = fit(
            vae,
            data,
            config,
            out_dir=out,
            resume=resume if resume is not None else False,
            overwrite=args.overwrite,
            force_resume=args.force_resume,
        )
    except TrainingInterrupted as err:
        print(f"pyro-vae: {err}", file=sys.stderr)
        return err.exit_code
    seconds = time.perf_counter() - start
    if _torchrun_rank() != 0:
        return 0  # rank 0 writes the figures and reports
    if not args.no_figures:
        from pyro_vae.plotting import save_run_figures

        save_run_figures(vae, data, result, out)
    elbo = result.test_elbo
    print(f"test ELBO {elbo} nats/image after {result.steps} steps in {seconds:.1f} s; run directory: {out}")
    return 0


def _load_run(run_dir: Path):
    from pyro_vae.checkpoint import CheckpointDir, load_checkpoint
    from pyro_vae.model import VAE

    checkpoint = CheckpointDir(run_dir).latest() if run_dir.is_dir() else None
    if checkpoint is None:
        raise ConfigError(f"{run_dir} holds no checkpoint (last.pt); pass a directory written by 'pyro-vae train'")
    payload = load_checkpoint(checkpoint)
    config = RunConfig.from_dict(payload["config"])
    vae = VAE.from_config(config.model, int(payload["input_dim"]))
    vae.load_state_dict(payload["model"])
    vae.eval()
    return config, vae, payload


def cmd_evaluate(args: argparse.Namespace) -> int:
    config, vae, _ = _load_run(args.run_dir)
    import torch

    from pyro_vae.data import binarize_eval, load_dataset
    from pyro_vae.evaluation import DataProtocol, evaluate

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_dataset(config.data)
    x_test = binarize_eval(data.x_test, config.data.binarize, config.train.seed, config.data.threshold)
    if args.n is not None:
        if args.n > x_test.shape[0]:
            available = x_test.shape[0]
            raise ConfigError(f"--n {args.n} exceeds the run's {available} test images; use --n {available} or less")
        x_test = x_test[: args.n]
    drawn = config.data.binarize in ("dynamic", "static")  # only Bernoulli draws have a seed
    protocol = DataProtocol(data.name, "test", config.data.binarize, config.train.seed if drawn else None)
    result = evaluate(vae, x_test, args.k, protocol=protocol, chunk_size=args.chunk_size, seed=args.seed)
    record = result.to_json()
    print(result.table())
    if args.gaps:
        from pyro_vae.gaps import inference_gaps

        gaps = inference_gaps(
            vae,
            x_test[: args.gap_images],
            k=max(args.k),
            steps=args.gap_steps,
            chunk_size=args.chunk_size,
            seed=args.seed,
        )
        record["gaps"] = gaps.to_json()
        print()
        print(gaps.table())
    out = args.out or args.run_dir / "eval.json"
    try:
        out.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as err:
        raise ConfigError(f"cannot write {out}: {err.strerror}; pass another --out") from None
    print(f"wrote {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    _, vae, payload = _load_run(args.run_dir)
    from pyro_vae.plotting import sample_grid

    if args.out.suffix.lower() != ".png":
        raise ConfigError(f"--out must be a .png file, got {args.out}")
    fig = sample_grid(vae, payload.get("image_shape"), n=args.n, seed=args.seed)
    try:
        fig.savefig(args.out, dpi=100)
    except OSError as err:
        raise ConfigError(f"cannot write {args.out}: {err.strerror}") from None
    print(f"wrote {args.n} samples to {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    out = args.out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    _prepare_out_dir(out, args.overwrite)

    from pyro_vae.compare import compare
    from pyro_vae.train import environment_info

    seeds = list(range(args.seeds))
    (out / "config.json").write_text(
        json.dumps(
            {"config": config.to_dict(), "guides": args.guides, "seeds": seeds, "environment": environment_info()},
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    start = time.perf_counter()
    result = compare(
        args.guides,
        config,
        seeds,
        out_dir=out,
        isolate=args.isolate,
        nll_k=args.nll_k or None,
        nll_images=args.nll_images,
    )
    seconds = time.perf_counter() - start
    if not args.no_figures:
        from pyro_vae.plotting import comparison_figure

        comparison_figure(result).savefig(out / "compare.png", dpi=100)
    print(result.table())
    print(f"\n{result.protocol()}")
    print(f"\n{len(result.runs)} runs in {seconds:.0f} s; compare.md, compare.csv, runs.csv in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pyro-vae`` and ``python -m pyro_vae``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except PyroVAEError as err:
        if args.debug:
            raise
        print(f"pyro-vae: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
