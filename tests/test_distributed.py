"""Data parallelism through torchrun + gloo + DistributedDataParallel, on 2 CPU processes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pyro_vae.config import RunConfig
from pyro_vae.distributed import context_from_env, ddp, reduce_mean_se, session
from pyro_vae.errors import ConfigError
from pyro_vae.stats import mean_se

# What both workers share: a guide family whose noise is fixed per example, read from a table by the number of rows
# the family sees (set per step by the worker), and the process group from torchrun's environment.
PREAMBLE = textwrap.dedent(
    """
    import sys, pyro, torch
    import pyro.distributions as dist
    from pyro_vae.distributed import context_from_env, init, shutdown, sum_over_ranks, unwrap, wrap
    from pyro_vae.guides.gaussian import MVNDiag

    class FixedNoise(dist.Normal):
        table = {}  # rows -> (rows, L) noise
        def rsample(self, sample_shape=torch.Size()):
            return self.loc + self.scale * FixedNoise.table[self.loc.shape[0]]

    class FixedNoiseFamily(MVNDiag):
        def forward(self, raw, context=None):
            loc, scale = self.split(raw)
            return FixedNoise(loc, scale).to_event(1)

    torch.set_num_threads(1)
    ctx = context_from_env("cpu")
    world, rank = (ctx.world_size, ctx.rank) if ctx else (1, 0)
    if ctx:
        init(ctx)
    """
)

# A worker that takes ONE SVI step on its shard and saves the parameters. The guide's noise is fixed per example
# (a test family reads it from a table indexed by the example's global position), so a 2-process step over
# B/2 + B/2 examples and a 1-process step over the same B examples see exactly the same noise.
WORKER = PREAMBLE + textwrap.dedent(
    """
    from pyro.infer import SVI, Trace_ELBO
    from pyro_vae.model import VAE
    from pyro_vae.optim import SingleOptimizer

    N, D, L, B = 64, 12, 3, 16
    g = torch.Generator().manual_seed(0)
    data = torch.bernoulli(torch.full((N, D), 0.4), generator=g)
    noise = torch.randn(N, L, generator=g)
    batch = torch.arange(B)                      # the same B examples in both runs
    local = batch[rank::world]                   # this rank's share (B / world of them)
    torch.manual_seed(1 + rank)                  # different weights per rank: DDP must broadcast rank 0's
    vae = VAE(D, latent_dim=L, hidden_dims=(8, 4), guide=FixedNoiseFamily(L))
    if ctx:
        wrap(vae, ctx)
    FixedNoise.table = {len(local): noise[local]}
    svi = SVI(vae.model, vae.guide, SingleOptimizer(torch.optim.SGD, {"lr": 0.01}), Trace_ELBO())
    svi.step(data[local], N, local)
    sums = sum_over_ranks(rank + 1.0, 1)         # 1 + 2 = 3 over two ranks, and a count of 2
    if rank == 0:
        torch.save(vae.state_dict(), sys.argv[1])
        torch.save(torch.tensor(sums, dtype=torch.float64), sys.argv[1] + ".sums")
    if ctx:
        unwrap(vae)
        shutdown()
    """
)


def run_worker(tmp_path, nproc, out, worker=WORKER):
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(script), str(out)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(script),
            str(out),
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_process_step_equals_one_process_step_on_the_same_examples(tmp_path):
    """Each rank's loss is scaled by N / (B/2) and DDP averages the two gradients; the result is the gradient of
    the 1-process loss scaled by N / B over all B examples. With SGD, equal gradients give equal parameters."""
    one = run_worker(tmp_path, 1, tmp_path / "one.pt")
    two = run_worker(tmp_path, 2, tmp_path / "two.pt")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    # sum_over_ranks (behind the reduced train ELBO): the values themselves alone, summed over both ranks under gloo
    assert torch.load(tmp_path / "one.pt.sums", weights_only=True).tolist() == [1.0, 1.0]
    assert torch.load(tmp_path / "two.pt.sums", weights_only=True).tolist() == [3.0, 2.0]


# M2 (pyro_vae.labelled) runs the encoder twice in one step (the unlabelled images, every class enumerated, and the
# labelled ones) and its classifier in both programs; DDP must still average each parameter's whole gradient once.
# The guide's noise is fixed per image (and per enumerated class), read from a table by the number of rows the family
# sees, so a 1-process and a 2-process step draw the same z.
M2_WORKER = PREAMBLE + textwrap.dedent(
    """
    from pyro.infer import SVI
    from pyro_vae.labelled import SSVAE, LabelledPart
    from pyro_vae.objectives import make_objective
    from pyro_vae.optim import SingleOptimizer

    N_U, N_L, D, L, C, B, B_L = 64, 16, 12, 3, 3, 16, 8
    g = torch.Generator().manual_seed(0)
    x_u = torch.bernoulli(torch.full((N_U, D), 0.4), generator=g)
    x_l = torch.bernoulli(torch.full((N_L, D), 0.4), generator=g)
    y_l = torch.randint(0, C, (N_L,), generator=g)
    noise_u = torch.randn(N_U, C, L, generator=g)
    noise_l = torch.randn(N_L, L, generator=g)
    local = torch.arange(B)[rank::world]
    local_l = torch.arange(B_L)[rank::world]
    torch.manual_seed(1 + rank)  # different weights per rank: DDP must broadcast rank 0's
    m2 = SSVAE(D, C, latent_dim=L, hidden_dims=(8, 4), guide=FixedNoiseFamily(L), aux_weight=2.0)
    if ctx:
        wrap(m2, ctx)
    # enumerated rows are (class, image), flattened class-major
    FixedNoise.table = {C * len(local): noise_u[local].transpose(0, 1).reshape(-1, L), len(local_l): noise_l[local_l]}
    svi = SVI(m2.model, m2.guide, SingleOptimizer(torch.optim.SGD, {"lr": 0.01}), make_objective(enumerate=True))
    svi.step(x_u[local], N_U, local, labelled=LabelledPart(x_l[local_l], y_l[local_l], N_L, local_l))
    if rank == 0:
        torch.save(m2.state_dict(), sys.argv[1])
    if ctx:
        unwrap(m2)
        shutdown()
    """
)


@pytest.mark.slow
def test_two_process_m2_step_equals_one_process_step(tmp_path):
    """Each rank scales its unlabelled and labelled shares by N_u / (B/2) and N_l / (B_l/2); DDP averages the two
    gradients, which gives the one-process gradient over all images. With SGD, equal gradients give equal weights
    (float32 sums in another order: rtol 1e-5)."""
    one = run_worker(tmp_path, 1, tmp_path / "one.pt", M2_WORKER)
    two = run_worker(tmp_path, 2, tmp_path / "two.pt", M2_WORKER)
    assert one.keys() == two.keys()
    assert any(key.startswith("classifier.") for key in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


# A worker for session() and ddp() under torchrun. It records what it sees in a JSON file per rank:
# - a session that creates the process group destroys it on exit; one entered with a group that already exists
#   leaves it in place;
# - inside ddp(vae, ctx) the encoder's gradients are averaged across ranks (equal on both), after it they are not;
# - reduce_mean_se / combine_mean_se over 4 + 3 values with a mean of 1e7 and unit spread (where a sum-of-squares
#   reduction would lose the spread to cancellation), and with one rank holding no values.
SESSION_WORKER = textwrap.dedent(
    """
    import json, sys, torch
    import torch.distributed as dist
    from pyro.infer import Trace_ELBO
    from pyro_vae.config import RunConfig
    from pyro_vae.distributed import combine_mean_se, ddp, reduce_mean_se, session
    from pyro_vae.model import VAE
    from pyro_vae.stats import mean_se

    torch.set_num_threads(1)
    config = RunConfig().replace(train={"device": "cpu"})
    seen = {}
    with session(config) as ctx:
        rank, world = ctx.rank, ctx.world_size
        seen["initialised_inside"] = dist.is_initialized()
        values = 1e7 + torch.randn(7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        mine = values[rank::world]
        seen["reduced"] = list(reduce_mean_se(mine))
        seen["combined"] = list(combine_mean_se(mean_se(mine), mine.numel()))
        seen["rank0_only"] = list(reduce_mean_se(mine if rank == 0 else mine[:0]))
        torch.manual_seed(0)  # the same initial weights on both ranks
        vae = VAE(6, latent_dim=2, hidden_dims=(4,))
        x = torch.bernoulli(torch.full((4, 6), 0.2 + 0.5 * rank), generator=torch.Generator().manual_seed(rank))

        def gradients_agree():
            vae.zero_grad()
            torch.manual_seed(rank)
            Trace_ELBO().differentiable_loss(vae.model, vae.guide, x).backward()
            grad = torch.cat([p.grad.flatten() for p in vae.encoder.parameters()])
            both = [torch.empty_like(grad) for _ in range(world)]
            dist.all_gather(both, grad)
            return torch.equal(both[0], both[1])

        with ddp(vae, ctx):
            seen["ddp_gradients_agree"] = gradients_agree()
        seen["gradients_agree_after_ddp"] = gradients_agree()
    seen["initialised_after_own_session"] = dist.is_initialized()
    with open(f"{sys.argv[1]}.{rank}", "w") as f:
        json.dump(seen, f)
    """
)
# A second launch: the caller makes its own group first (a fresh process: a group destroyed and made again in one
# process under torchrun's store hung one rank now and then), and session() must use it and leave it in place.
CALLERS_GROUP_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from pyro_vae.config import RunConfig
    from pyro_vae.distributed import session

    dist.init_process_group("gloo")  # the caller's own group, from torchrun's environment
    seen = {}
    with session(RunConfig().replace(train={"device": "cpu"})) as ctx:
        seen["context_in_callers_group"] = ctx is not None and dist.get_world_size() == ctx.world_size
    seen["callers_group_left_in_place"] = dist.is_initialized()
    rank = dist.get_rank()
    dist.destroy_process_group()
    with open(f"{sys.argv[1]}.{rank}", "w") as f:
        json.dump(seen, f)
    """
)


@pytest.mark.slow
def test_session_destroys_only_what_it_created_and_ddp_unwraps(tmp_path):
    import json

    from scipy import stats

    for name, code in (("seen", SESSION_WORKER), ("callers", CALLERS_GROUP_WORKER)):
        script = tmp_path / f"{name}_worker.py"
        script.write_text(code)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
        proc = subprocess.run(
            [*cmd, str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    values = (1e7 + torch.randn(7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).numpy()
    rank0 = values[0::2]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"seen.{rank}").read_text())
        callers = json.loads((tmp_path / f"callers.{rank}").read_text())
        assert seen["initialised_inside"] and not seen["initialised_after_own_session"]
        assert callers["context_in_callers_group"] and callers["callers_group_left_in_place"]
        assert seen["ddp_gradients_agree"] and not seen["gradients_agree_after_ddp"]
        # Two-pass float64 pooling keeps the spread to ~1e-9 relative; a sum-of-squares reduction at a mean of 1e7
        # would carry an error of about eps·(1e7)² ≈ 1e-2 of the variance, far outside rel=1e-6.
        for key in ("reduced", "combined"):
            assert seen[key][0] == pytest.approx(values.mean(), rel=1e-15)
            assert seen[key][1] == pytest.approx(stats.sem(values), rel=1e-6), key
        assert seen["rank0_only"][0] == pytest.approx(rank0.mean(), rel=1e-15)
        assert seen["rank0_only"][1] == pytest.approx(stats.sem(rank0), rel=1e-6)


def test_session_outside_torchrun_yields_none_and_touches_nothing():
    import torch.distributed as dist

    with session(RunConfig(), env={}) as ctx:
        assert ctx is None and not dist.is_initialized()
    vae = torch.nn.Linear(2, 2)
    with ddp(vae, None) as same:
        assert same is vae
    assert not dist.is_initialized()


def test_session_refuses_a_bad_environment_before_joining():
    import torch.distributed as dist

    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        with session(RunConfig(), env={"WORLD_SIZE": "two", "RANK": "0"}):
            pass
    assert not dist.is_initialized()


def test_context_from_env():
    assert context_from_env(env={}) is None
    ctx = context_from_env("cpu", env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device.type, ctx.is_main) == (1, 2, "gloo", "cpu", False)


@pytest.mark.parametrize(
    ("env", "kw", "words"),
    [
        ({"WORLD_SIZE": "two", "RANK": "0"}, {}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, {}, "WORLD_SIZE must be >= 1"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, {}, r"RANK=2 is outside 0..1"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, {"backend": "mpi"}, "unknown distributed backend 'mpi'"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, {"device": "cpu", "backend": "nccl"}, "nccl backend needs CUDA"),
    ],
)
def test_bad_environment_or_backend(env, kw, words):
    with pytest.raises(ConfigError, match=words):
        context_from_env(env=env, **kw)


def test_reduce_mean_se_without_process_group_is_the_plain_estimate():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0])
    assert reduce_mean_se(values) == mean_se(values)
    assert reduce_mean_se(values) == (3.5, pytest.approx(values.double().std().item() / 2, rel=1e-15))


TINY_RUN = [
    "--n-train",
    "256",
    "--n-test",
    "64",
    "--batch-size",
    "32",
    "--hidden-dims",
    "32,16",
    "--latent-dim",
    "2",
    "--threads",
    "1",
]


def torchrun(*args, **kw):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pyro_vae",
        "train",
        *map(str, args),
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
        **kw,
    )


@pytest.mark.slow
def test_two_process_run_writes_exactly_one_set_of_files(tmp_path):
    out = tmp_path / "run"
    proc = torchrun("--out", out, "--epochs", "2", *TINY_RUN)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            ".lock",  # the writer's lock file (RunDir); it stays, unlocked
            "config.json",
            "metrics.jsonl",
            "last.pt",
            "last.pt.sha256",
            "last.prev.pt",
            "last.prev.pt.sha256",
            "latent.png",
            "loss.png",
            "reconstructions.png",
            "samples.png",
        ]
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one writer: two epochs, two records
    import json

    # 256 images, 2 ranks, local batch 32: 4 steps per epoch on each rank
    assert [json.loads(line)["step"] for line in lines] == [4, 8]
    assert log.count("nats/image after") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_killed_two_process_run_resumes_and_completes(tmp_path):
    import json
    import time

    out = tmp_path / "run"
    proc = torchrun("--out", out, "--epochs", "100", "--checkpoint-every", "2", *TINY_RUN)
    deadline = time.monotonic() + 240
    metrics = out / "metrics.jsonl"
    # Two epochs recorded (their checkpoints written first), then kill every process of the job.
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    _kill_every_process_naming(out)  # torchrun starts its workers in sessions of their own
    proc.communicate()
    # Killed mid-run: fewer epoch records than the run has epochs (the newest checkpoint may be a step-checkpoint just
    # before the epoch's, or have lost its sidecar to the kill, so its step is not asserted).
    assert 2 <= len((out / "metrics.jsonl").read_text().splitlines()) < 100
    resumed = torchrun("--resume", out, "--no-figures")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(100))
    assert _saved_step(out) == 100 * 4


def _kill_every_process_naming(path) -> None:
    """SIGKILL every process whose command line names ``path`` (the launcher and its workers)."""
    import signal
    from pathlib import Path

    needle = str(path).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue  # the process ended meanwhile


def _saved_step(out) -> int:
    """Step of the run's newest checkpoint; -1 while there is none (or it is being replaced right now)."""
    from pyro_vae.checkpoint import load_checkpoint
    from pyro_vae.errors import CheckpointError

    try:
        return load_checkpoint(out / "last.pt")["progress"]["step"]
    except CheckpointError:
        return -1


def test_bad_world_size_through_the_cli_is_one_line(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "train", "--out", str(tmp_path / "r"), *TINY_RUN],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if "error" in line]
    assert "WORLD_SIZE='two' is not an integer" in error and "Traceback" not in proc.stderr


def _cli(*args):
    """``pyro-vae train ARGS`` as one process (no torchrun)."""
    cmd = [sys.executable, "-m", "pyro_vae", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _files(run) -> dict:
    """Every file of a run directory and its bytes, but ``.lock``, where each writer that takes the lock writes its
    pid, a refused one included."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.name != ".lock"}


def _error_line(log: str) -> str:
    (line,) = {line for line in log.splitlines() if line.startswith("pyro-vae:")}  # once per rank under torchrun
    return line


@pytest.mark.slow
def test_defect_3_world_size_is_recorded_and_a_resume_under_another_is_refused(tmp_path):
    """Issue 11, defect 3: a 2-process run resumed with one process went on with half the global batch. The world
    size and the global batch are recorded in config.json and in the checkpoint; 2 → 1 and 1 → 2 are refused with
    one line naming both sizes and write nothing; --force-resume continues (under the new world size)."""
    import json

    from pyro_vae.checkpoint import load_checkpoint

    out = tmp_path / "run"
    proc = torchrun("--out", out, "--epochs", "2", "--device", "cpu", "--no-figures", *TINY_RUN)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    # 256 images, local batch 32 on each of 2 ranks: a global batch of 64, 4 steps per epoch
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["global_batch"]) == (2, 64)
    state = load_checkpoint(out / "last.pt")
    assert (state["world_size"], state["global_batch"], state["progress"]["step"]) == (2, 64, 8)

    before = _files(out)
    refused = _cli("--resume", out, "--epochs", "3", "--no-figures")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    line = _error_line(refused.stderr)
    assert line.startswith(f"pyro-vae: error: cannot resume {out / 'last.pt'}: "), line
    assert "world size (processes): 2 → 1;" in line and line.endswith("pass --force-resume to continue anyway")
    assert _files(out) == before

    forced = _cli("--resume", out, "--epochs", "3", "--no-figures", "--force-resume")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "world size (processes): 2 → 1" in forced.stderr  # the forced resume says what it overrode
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # epoch 2 ran on one process: 8 local steps of 32, the whole epoch, after the 2 × 4 steps of the first run
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 4), (1, 8), (2, 16)]
    state = load_checkpoint(out / "last.pt")
    assert (state["world_size"], state["global_batch"], state["progress"]["step"]) == (1, 32, 16)
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["global_batch"], config["resumed_from"]) == (1, 32, {"step": 8})

    before = _files(out)
    proc = torchrun("--resume", out, "--epochs", "4", "--no-figures")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "exitcode  : 2" in log  # a worker's own refusal (torchrun reports it, with its own traceback)
    line = _error_line(log)
    assert "world size (processes): 1 → 2;" in line, line
    assert _files(out) == before
