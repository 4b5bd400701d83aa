"""Training-step speed: the pyro_vae SVI step against hand-written PyTorch, side by side in one process.

Contenders (same initial weights, same batches, each with its own copy of the same RNG stream):

* ``a`` — pyro_vae's plain-ELBO step, ``TrainStep(vae, TrainConfig(lr=1e-3, kl_schedule=None), num_data=N)``, the
  step :func:`pyro_vae.fit` calls once a KL warm-up has ended (``Trace_ELBO``, one fused AdamW behind the non-finite
  guard, validation on for the first step only);
* ``b`` — hand-written PyTorch VAE over the same networks: reparameterisation by hand, closed-form KL, Bernoulli
  log-likelihood from logits, default ``torch.optim.AdamW``;
* ``c`` — ``b`` with ``fused=True``;
* ``d`` — Pyro out of the box: ``SVI`` + ``Trace_ELBO`` + ``pyro.optim.AdamW`` (one optimiser per tensor), validation
  on, the seed family written literally as ``MultivariateNormal(loc, scale_tril=diag_embed(scale))`` and the prior
  as ``Normal(0, 1).expand([B, L]).to_event(1)``;
* ``e`` — ``a`` compiled: ``TrainStep(vae, TrainConfig(lr=1e-3, kl_schedule=None, compile=True), num_data=N)``, the
  step ``pyro-vae train --compile --kl-schedule none`` runs (the first step eager and validated, then one traced graph
  compiled by Inductor; on CUDA ``mode="reduce-overhead"``, CUDA graphs). Its warm-up (at least 3 steps, untimed)
  holds the trace and the compilation.

Contenders run interleaved in chunks with a rotating order; the table gives the median and interquartile range of
the per-step time and the *paired* ratios (per round, the ratio of the two contenders' chunk medians; then the
median over rounds). The FLOP-bound fraction is ``6 × parameters × batch / matmul_rate / step_time``, with the matmul
rate measured in the same run. All AdamW variants use lr 1e-3 and weight decay 0, so every contender optimises the
same objective.

For ``e`` the table also gives the compile time (its warm-up minus ``a``'s warm-up over the same steps), the break-even
step count ``compile_time / (t_a - t_e)`` after which compiling has paid for itself against the eager step, and the
peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per contender, on CPU the peak RSS of fresh processes
(``fit`` with and without ``compile``).

A component table (``benchmarks/_components.py``) races ``a`` with one prior (``standard``, ``mog:10``, ``vamp:50``,
``flow:4``), likelihood (``bernoulli``, ``continuous_bernoulli``, ``gaussian``, ``gaussian:learned``, ``beta``,
``discretized_logistic``) or network (``mlp``, ``conv``) changed against ``a`` with the seed configuration, gives
their paired ratio, the threads and the machine's load at its start and end (flagged when above the CPU count), and
a derived s/epoch of ``conv`` against ``mlp`` (``--quick``: only ``vamp:50``, ``discretized_logistic`` and ``conv``).

Run ``python benchmarks/train_speed.py`` for the full table, ``--quick`` for a smoke run; ``--device cuda``,
``--batch-sizes 128,1024`` and ``--contenders abde`` choose the rows, ``--table-only`` leaves out the family and
component tables, the peak RSS and the ``--help`` time; ``--families-only`` and ``--components-only`` run one table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.optim
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO

from pyro_vae.config import DataConfig, TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.guides.gaussian import MVNDiag
from pyro_vae.model import VAE
from pyro_vae.step import TrainStep

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers next to this script, however it is run
from _components import components  # noqa: E402
from _race import Contender, batch_pool, paired, race, rng_states, summary  # noqa: E402

LR = 1e-3


class LiteralMVNDiag(MVNDiag):
    """The seed family as a user would write it, without pyro_vae's diagonal fast path."""

    def forward(self, raw):
        loc, scale = self.split(raw)
        return pyro.distributions.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))


class LiteralPriorVAE(VAE):
    """The prior as a user would write it, without pyro_vae's standard-normal fast path."""

    def _prior(self, x):
        normal = pyro.distributions.Normal(x.new_zeros(()), x.new_ones(()))
        return normal.expand([x.shape[0], self.latent_dim]).to_event(1)


def make_pyro_step(vae: VAE, num_data: int, out_of_the_box: bool, compile: bool = False):
    if out_of_the_box:
        svi = SVI(vae.model, vae.guide, pyro.optim.AdamW({"lr": LR, "weight_decay": 0.0}), Trace_ELBO())

        def step(x, index):
            with pyro.validation_enabled(True):
                return svi.step(x, num_data) / num_data

        return step
    # kl_schedule=None: the plain ELBO, like the hand-written contenders (a warm-up would also keep (e) eager).
    return TrainStep(vae, TrainConfig(lr=LR, kl_schedule=None, compile=compile), num_data=num_data).step


def make_torch_step(vae: VAE, num_data: int, fused: bool):
    """A hand-written VAE step over the same networks: the reference a Pyro user would otherwise write."""
    optim = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=0.0, fused=fused or None)
    latent = vae.latent_dim
    eps = vae.family.eps

    def step(x, index=None):  # the index is unused: no plate, the N / B scale is written out
        raw = vae.encoder(x)  # (B, 2L)
        loc, scale = raw[:, :latent], F.softplus(raw[:, latent:]) + eps
        z = loc + scale * torch.randn_like(loc)
        logits = vae.decoder(z)
        rec = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        kl = 0.5 * (scale.square() + loc.square() - 1).sum(-1) - scale.log().sum(-1)
        loss = -(rec - kl).sum() * (num_data / x.shape[0])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        return loss.item() / num_data

    return step


def matmul_rate(seconds: float = 1.0, device: str | torch.device = "cpu") -> float:
    """FLOP/s of float32 square matmuls of size 1024 on ``device`` (median of repeated timings)."""
    device = torch.device(device)
    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 5:
        start = time.perf_counter()
        a @ b
        sync()
        rates.append(2 * 1024**3 / (time.perf_counter() - start))
    return statistics.median(rates)


def build(latent: int, guide: str, input_dim: int, literal: bool = False, device="cpu") -> VAE:
    torch.manual_seed(0)
    if literal:  # Pyro out of the box: the seed family and the prior written literally
        family = LiteralMVNDiag(latent) if guide == "mvn_diag" else guide
        return LiteralPriorVAE(input_dim, latent_dim=latent, guide=family).to(device)
    return VAE(input_dim, latent_dim=latent, guide=guide).to(device)


MAKERS = {
    "a": lambda v, n: make_pyro_step(v, n, out_of_the_box=False),
    "b": lambda v, n: make_torch_step(v, n, fused=False),
    "c": lambda v, n: make_torch_step(v, n, fused=True),
    "d": lambda v, n: make_pyro_step(v, n, out_of_the_box=True),
    "e": lambda v, n: make_pyro_step(v, n, out_of_the_box=False, compile=True),
}


def run_setting(x_train, batch, latent, guide, contenders, rounds, chunk, warmup) -> dict:
    """Race ``contenders`` at one setting. ``compile_s``: ``e``'s warm-up time minus ``a``'s (``None`` without both)."""
    n, device = x_train.shape[0], x_train.device
    if "e" in contenders:
        warmup = max(warmup, 3)  # e: step 1 eager and validated, step 2 traces and compiles, 3 on CUDA records
    pool = batch_pool(x_train, batch, rounds * chunk + warmup, "dynamic")
    reference = build(latent, "mvn_diag", x_train.shape[1], device=device)
    rng = rng_states(device)
    racers = []
    for name in contenders:
        # b and c are hand-written for the seed family; a, d and e run the family under test.
        vae = build(latent, guide if name in "ade" else "mvn_diag", x_train.shape[1], name == "d", device)
        if guide == "mvn_diag":
            vae.load_state_dict(reference.state_dict())
        racers.append(Contender(name, vae, MAKERS[name](vae, n), device, rng))
    warm = race(racers, dict.fromkeys(contenders, pool), rounds, chunk, warmup)
    params = sum(p.numel() for p in reference.parameters())
    compile_s = warm["e"] - warm["a"] if "a" in warm and "e" in warm else None
    return {"racers": {c.name: c for c in racers}, "params": params, "compile_s": compile_s}


_PEAK = "status_mib('VmHWM')"  # pyro_vae._memory: the one way the package reads peak memory


def peak_rss(steps: int, *, compiled: bool = True) -> dict[str, float]:
    """Peak RSS (VmHWM, MiB) of fresh processes: after ``import torch`` only (the floor), after ``steps`` steps of
    the hand-written loop (b), and after ``steps`` steps of ``pyro_vae.fit`` without (a) and with compile (e) on the
    embedded data (Inductor's compilation included: it runs in the process).

    ``ru_maxrss`` is not used: Linux carries the parent's high-water mark across ``exec``.
    """
    prelude = "import sys, torch\nfrom pyro_vae._memory import status_mib\n"
    floor = prelude + f"print({_PEAK})"
    hand = prelude + (
        "sys.path.insert(0, sys.argv[1])\n"
        "from train_speed import make_torch_step\n"
        "from pyro_vae.config import DataConfig\n"
        "from pyro_vae.data import EpochBatches, load_dataset\n"
        "from pyro_vae.model import VAE\n"
        "data = load_dataset(DataConfig())\n"
        "step = make_torch_step(VAE(data.input_dim), data.x_train.shape[0], fused=False)\n"
        "batches = EpochBatches(data.x_train, batch_size=128, seed=0, binarize='dynamic')\n"
        f"for _, b in zip(range({steps}), (b for e in range(100) for b in batches.batches(e))):\n"
        "    step(b.x)\n"
        f"print({_PEAK})"
    )

    def fit(compile: bool) -> str:
        return prelude + (
            "from pyro_vae.config import DataConfig, RunConfig, TrainConfig\n"
            "from pyro_vae.data import load_dataset\n"
            "from pyro_vae.model import VAE\n"
            "from pyro_vae.train import fit\n"
            f"cfg = RunConfig(train=TrainConfig(epochs=100, max_steps={steps}, progress=False, compile={compile}, "
            "kl_schedule=None))\n"
            "data = load_dataset(DataConfig())\n"
            "fit(VAE.from_config(cfg.model, data.input_dim), data, cfg)\n"
            f"print({_PEAK})"
        )

    here = str(Path(__file__).resolve().parent)
    out = {}
    codes = (("import torch", floor), ("hand-written (b)", hand), ("pyro_vae fit (a)", fit(False)))
    if compiled:  # --quick leaves it out: the table's (e) compiles already, and a second Inductor run costs ~20 s
        codes += (("pyro_vae fit --compile (e)", fit(True)),)
    for name, code in codes:
        proc = subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True, check=True)
        out[name] = float(proc.stdout.split()[-1])
    return out


def help_time(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pyro_vae", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI): numbers are not meaningful")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes at L=16 (default: the table)")
    parser.add_argument("--contenders", default="abcde", help="which of a-e race (default abcde; a is required)")
    parser.add_argument(
        "--table-only", action="store_true", help="leave out the families, components, peak RSS and --help time"
    )
    parser.add_argument("--families-only", action="store_true", help="only the table of every family (a, b and e)")
    parser.add_argument(
        "--components-only",
        action="store_true",
        help="only the table of every prior, likelihood and network (a against a with the seed configuration)",
    )
    args = parser.parse_args(argv)
    if "a" not in args.contenders or set(args.contenders) - set(MAKERS):
        parser.error(f"--contenders must name a and any of {''.join(MAKERS)}, got {args.contenders!r}")
    return args


def table_row(batch, latent, guide, result, rate, device) -> str:
    """One row: medians (ms), the paired ratios whose contenders raced, the FLOP-bound fractions, e's compile."""
    r = result["racers"]
    med = {k: summary(v) for k, v in r.items()}
    cell = {k: f"{m[0] * 1e3:.2f}" for k, m in med.items()}
    cell["a"] = f"{cell['a']} ({med['a'][1] * 1e3:.2f}–{med['a'][2] * 1e3:.2f})"
    ratios = [f"{paired(r[x], r[y]):.3f}" if x in r and y in r else "–" for x, y in RATIOS]
    flop_time = 6 * result["params"] * batch / rate
    bound = [f"{flop_time / med[k][0]:.0%}" if k in med else "–" for k in "ae"]
    compile_cells = ["–", "–", "–"]
    if "e" in r:
        t_a, t_e = med["a"][0], med["e"][0]
        even = f"{result['compile_s'] / (t_a - t_e):.0f}" if t_a > t_e else "never"
        peak = (
            f"{r['e'].peak_bytes / 2**20:.0f} / {r['a'].peak_bytes / 2**20:.0f}" if device.type == "cuda" else "RSS ↓"
        )
        compile_cells = [f"{result['compile_s']:.1f}", even, peak]
    cells = [str(batch), str(latent), guide] + [cell.get(k, "–") for k in "abcde"] + ratios + bound + compile_cells
    return "| " + " | ".join(cells) + " |"


RATIOS = [("a", "b"), ("a", "c"), ("d", "a"), ("e", "b"), ("d", "e"), ("e", "a")]
HEADER = (
    "| B | L | guide | a ms (IQR) | b ms | c ms | d ms | e ms | "
    + " | ".join(f"{x}/{y}" for x, y in RATIOS)
    + " | FLOP-bound a | FLOP-bound e | e compile s | e break-even steps | peak MiB e / a |"
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rounds, chunk, warmup = (2, 2, 1) if args.quick else (args.rounds, args.chunk, 10)
    data = load_dataset(DataConfig(dataset="embedded"))
    x = data.x_train.to(device)
    rate = matmul_rate(0.2 if args.quick else 2.0, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"# train_speed on {name}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, pyro {pyro.__version__}; matmul rate {rate / 1e9:.1f} GFLOP/s"
    )
    print(f"# {rounds} rounds × {chunk} steps per contender, rotating order; times in ms per step")

    if args.families_only:
        families(x, rounds, chunk, warmup, args.quick)
        return 0
    if args.components_only:
        components(x, data.image_shape, (rounds, chunk, warmup), MAKERS["a"], args.quick)
        return 0
    who = args.contenders
    if args.batch_sizes:
        settings = [(int(b), 16, "mvn_diag", who) for b in args.batch_sizes.split(",")]
    else:
        settings = [(128, 16, "mvn_diag", who)]
        if not args.quick:
            settings += [(512, 16, "mvn_diag", who), (2048, 16, "mvn_diag", who)]
            settings += [(128, 2, "mvn_diag", who), (128, 50, "mvn_diag", who)]
    print(HEADER)
    print("|---" * (HEADER.count("|") - 1) + "|")
    for batch, latent, guide, racing in settings:
        result = run_setting(x, batch, latent, guide, racing, rounds, chunk, warmup)
        print(table_row(batch, latent, guide, result, rate, device), flush=True)
        r = result["racers"]
        if batch == 128 and latent == 16 and "d" in r:
            first = abs(r["a"].losses[0] - r["d"].losses[0])
            print(f"#   same weights, data and noise: |loss_a - loss_d| at step 1 = {first:.2e} nats per image")
        if "e" in r:  # same weights, batches and noise: they differ only by float32 reassociation in fused kernels
            drift = max(abs(e - a) / abs(a) for a, e in zip(r["a"].losses, r["e"].losses, strict=True))
            print(f"#   B={batch}: max relative |loss_e - loss_a| over the {len(r['a'].losses)} steps = {drift:.1e}")
    if args.table_only:
        return 0
    extras(x, rounds, chunk, warmup, args.quick)
    components(x, data.image_shape, (rounds, chunk, warmup), MAKERS["a"], args.quick)
    return 0


def families(x, rounds: int, chunk: int, warmup: int, quick: bool) -> None:
    """Every family at B=128, L=16: step a and the compiled step e with that family, b the hand-written seed family
    (``--quick``: the seed family, without e, whose compilation the main table already smoke-tests)."""
    from pyro_vae.guides import family_names

    names, who = (["mvn_diag"], "ab") if quick else (family_names(), "abe")
    print("\n# every registered family at B=128, L=16: a and e with that family, b is the hand-written seed family")
    print("| guide | a ms (IQR) | b ms | e ms | a/b | e/b | e compile s |")
    print("|---|---|---|---|---|---|---|")
    for guide in names:
        result = run_setting(x, 128, 16, guide, who, rounds, chunk, warmup)
        r = result["racers"]
        a, b = summary(r["a"]), summary(r["b"])
        e = f"{summary(r['e'])[0] * 1e3:.2f}" if "e" in r else "–"
        e_b = f"{paired(r['e'], r['b']):.3f}" if "e" in r else "–"
        compile_s = f"{result['compile_s']:.1f}" if result.get("compile_s") is not None else "–"
        print(
            f"| {guide} | {a[0] * 1e3:.2f} ({a[1] * 1e3:.2f}–{a[2] * 1e3:.2f}) | {b[0] * 1e3:.2f} | {e} | "
            f"{paired(r['a'], r['b']):.3f} | {e_b} | {compile_s} |"
        )


def extras(x, rounds: int, chunk: int, warmup: int, quick: bool) -> None:
    """Every family against the hand-written loop, the peak RSS of fresh processes and the ``--help`` time."""

    families(x, rounds, chunk, warmup, quick)

    peaks = peak_rss(20 if quick else 300, compiled=not quick)
    floor = peaks["import torch"]
    print("\n| process | peak RSS MiB | over the import-torch floor |")
    print("|---|---|---|")
    for name, value in peaks.items():
        print(f"| {name} | {value:.0f} | {value - floor:+.0f} |")
    print(f"pyro-vae --help: {help_time(3 if quick else 11) * 1e3:.0f} ms (median, whole process)")


if __name__ == "__main__":
    sys.exit(main())
