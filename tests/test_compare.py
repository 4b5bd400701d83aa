"""``compare``: the same protocol for every family, rows reproducible on their own, honest summaries."""

import csv
import dataclasses
import io
import json
import math
import statistics

import pytest
import torch

from pyro_vae import DataConfig, RunConfig, cli, fit, load_dataset
from pyro_vae.compare import CompareResult, SeedRun, compare, initial_vae
from pyro_vae.compare_report import summarise
from pyro_vae.config import ModelConfig
from pyro_vae.data import binarize_eval
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.evaluation import DataProtocol, MeanSE, evaluate

TINY_DATA = DataConfig(n_train=300, n_test=100)
TINY_MODEL = ModelConfig(latent_dim=2, hidden_dims=(32, 16))
TINY = RunConfig(data=TINY_DATA, model=TINY_MODEL).replace(train={"epochs": 2, "batch_size": 100, "progress": False})


@pytest.fixture(scope="module")
def data():
    return load_dataset(TINY_DATA)


def test_a_row_equals_a_separate_single_family_run(data):
    result = compare(["mvn_diag", "full_rank", "iaf:2"], TINY, seeds=[0, 1], data=data, nll_k=20, nll_images=30)
    assert [row.guide for row in result.rows] == ["mvn_diag", "full_rank", "iaf:2"]
    row_runs = {(run.guide, run.seed): run for run in result.runs}
    for guide in ("full_rank", "iaf:2"):
        config = TINY.replace(model={"guide": guide}, train={"seed": 1})
        vae = initial_vae(config.model, data.input_dim, seed=1)
        alone = fit(vae, data, config)
        assert row_runs[(guide, 1)].test_elbo == alone.test_elbo
        assert row_runs[(guide, 1)].steps == alone.steps
        x_test = binarize_eval(data.x_test, "dynamic", 1)[:30]
        assert row_runs[(guide, 1)].nll == evaluate(vae, x_test, ks=(20,), seed=1).nll
    # and a comparison of that family alone gives the same row
    single = compare(["iaf:2"], TINY, seeds=[0, 1], data=data, nll_k=20, nll_images=30)
    assert single.rows[0].test_elbo == result.rows[2].test_elbo and single.rows[0].nll == result.rows[2].nll
    nlls = [row_runs[("iaf:2", s)].nll.mean for s in (0, 1)]
    assert result.rows[2].nll.mean == pytest.approx(statistics.fmean(nlls))


def test_shared_parts_start_identical_across_families():
    first = initial_vae(TINY_MODEL, 784, seed=3)  # mvn_diag
    for guide in ("diag_normal", "full_rank", "low_rank", "iaf:2", "sylvester:2"):
        other = initial_vae(ModelConfig(latent_dim=2, hidden_dims=(32, 16), guide=guide), 784, seed=3)
        for part in ("body", "decoder"):
            a = (first.encoder.body if part == "body" else first.decoder).state_dict()
            b = (other.encoder.body if part == "body" else other.decoder).state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), f"{part} differs for {guide}"
        # the head's rows that emit the base Gaussian's 2L numbers come from the same stream
        torch.testing.assert_close(other.encoder.head.weight[:4], first.encoder.head.weight[:4], rtol=0, atol=0)
    again = initial_vae(ModelConfig(latent_dim=2, hidden_dims=(32, 16), guide="iaf:2"), 784, seed=3)
    other = initial_vae(ModelConfig(latent_dim=2, hidden_dims=(32, 16), guide="iaf:2"), 784, seed=3)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in again.state_dict().items())
    assert not torch.equal(initial_vae(TINY_MODEL, 784, seed=4).decoder.net[0].weight, first.decoder.net[0].weight)


def _run(guide, seed, elbo, seconds, memory=None):
    return SeedRun(guide, seed, MeanSE(elbo, 0.1), tuple(seconds), memory, 4, 100, 10, "d")


def test_summary_statistics():
    runs = [
        _run("mvn_diag", 0, -100.0, [1.0, 3.0, 2.0], 10.0),
        _run("mvn_diag", 1, -102.0, [2.0, 2.0, 2.0], 12.0),
        _run("iaf:2", 0, -99.0, [4.0, 5.0, 6.0]),
        _run("iaf:2", 1, -98.0, [5.0, 5.0, 4.0]),
    ]
    rows = summarise(["iaf:2", "mvn_diag"], runs)
    iaf, seed = rows
    assert seed.test_elbo.mean == -101.0
    assert seed.test_elbo.se == pytest.approx(statistics.stdev([-100.0, -102.0]) / math.sqrt(2))
    assert seed.seconds_per_epoch == 2.0 and seed.time_ratio == 1.0 and seed.peak_memory_mib == 12.0
    assert iaf.seconds_per_epoch == 5.0 and iaf.time_ratio == 2.5 and iaf.peak_memory_mib is None
    lone = summarise(["iaf:2"], runs[2:3])[0]
    assert lone.time_ratio is None and math.isnan(lone.test_elbo.se)


def test_tables_and_files(data, tmp_path):
    result = compare(
        ["mvn_diag", "low_rank"], TINY.replace(train={"epochs": 1}), seeds=[0], data=data, out_dir=tmp_path, nll_k=None
    )
    assert isinstance(result, CompareResult)
    for name in ("compare.md", "compare.csv", "runs.csv"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "runs" / "low_rank-seed0" / "metrics.jsonl").is_file()
    rows = list(csv.DictReader(io.StringIO((tmp_path / "compare.csv").read_text())))
    assert [r["guide"] for r in rows] == ["mvn_diag", "low_rank"]
    assert float(rows[0]["time_ratio_to_mvn_diag"]) == 1.0
    assert float(rows[1]["test_elbo_mean"]) == result.rows[1].test_elbo.mean
    markdown = (tmp_path / "compare.md").read_text()
    assert "| mvn_diag |" in markdown and "embedded-fashion-mnist" in markdown and "n/a" in markdown
    assert "IS-NLL" not in markdown and rows[0]["nll_mean"] == ""
    assert result.table().splitlines()[0].startswith("guide")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"values": ["mvn_diag", "iaff:2"]}, "did you mean 'iaf'"),
        ({"values": ["iaf", "iaf"]}, "must be distinct"),
        ({"values": []}, "at least one guide"),
        ({"values": ["mvn_diag"], "seeds": []}, "seeds must be"),
        ({"values": ["mvn_diag"], "seeds": [-1]}, "^every seed must be an integer >= 0, got -1$"),
        (
            {"values": ["mvn_diag"], "seeds": [2**32]},
            r"^every seed must be at most 4294967295 \(numpy seeds are 32-bit\)",
        ),
        ({"values": ["mvn_diag"], "isolate": True, "data": "given"}, "pass data=None"),
        (
            {"values": ["mvn_diag"], "nll_k": 0},
            r"^nll_k \(particles per image\) must be a positive integer or None, got 0$",
        ),
        (
            {"values": ["mvn_diag"], "nll_images": 0},
            r"^nll_images \(None: all test images\) must be a positive integer or",
        ),
    ],
)
def test_bad_input_is_refused_before_training(kwargs, words, data):
    if kwargs.get("data") == "given":
        kwargs["data"] = data
    kwargs.setdefault("data", data)
    with pytest.raises(ConfigError, match=words):
        compare(config=TINY, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"values": ["mvn_diag", "iaff:2"]}, "did you mean 'iaf'"),
        ({"values": ["mvn_diag"], "seeds": [0, 0]}, "seeds must be distinct"),
        ({"values": ["mvn_diag"], "config": TINY.replace(train={"batch_size": 1000})}, "exceeds the 300 training"),
        (
            {"values": ["mvn_diag"], "data": None, "config": TINY.replace(data={"dataset": "npz", "path": "no.npz"})},
            "no.npz",
        ),
    ],
)
def test_a_refused_comparison_writes_nothing_and_the_rerun_is_accepted(kwargs, words, data, tmp_path):
    """Defect 9: a refused comparison left config.json behind, and the re-run was refused as 'already holds a run'.
    Every check (arguments, the data against the config, the output directory) now runs before the first write."""
    out = tmp_path / "c"
    kwargs = {"config": TINY, "data": data, **kwargs}
    with pytest.raises((ConfigError, DataError), match=words):
        compare(out_dir=out, nll_k=None, **kwargs)
    assert not out.exists()
    result = compare(["mvn_diag"], TINY.replace(train={"epochs": 1}), data=data, out_dir=out, nll_k=None)
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.md", "config.json", "runs", "runs.csv"]
    manifest = json.loads((out / "config.json").read_text())
    assert manifest["guides"] == ["mvn_diag"] and manifest["seeds"] == [0] and "torch" in manifest["environment"]
    assert result.rows[0].seeds == 1


def test_an_earlier_comparison_is_refused_before_any_run_unless_overwritten(data, tmp_path, monkeypatch):
    import pyro_vae.compare as compare_module

    config = TINY.replace(train={"epochs": 1})
    compare(["mvn_diag"], config, data=data, out_dir=tmp_path, nll_k=None)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    trained = []
    monkeypatch.setattr(compare_module, "fit", lambda *a, **kw: trained.append(1) or fit(*a, **kw))
    with pytest.raises(ConfigError, match="already holds a comparison.*overwrite=True"):
        compare(["mvn_diag", "low_rank"], config, data=data, out_dir=tmp_path, nll_k=None)
    assert not trained and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    again = compare(["mvn_diag"], config, data=data, out_dir=tmp_path, nll_k=None, overwrite=True)
    assert trained == [1] and again.rows[0].guide == "mvn_diag"


def test_the_nll_protocol_records_the_seed_only_for_drawn_binarisations(data, monkeypatch):
    """compare's IS-NLL protocol comes from DataProtocol.from_config: a threshold split has no seed."""
    import pyro_vae.compare as compare_module

    protocols = []

    def spy(vae, x, **kwargs):
        protocols.append(kwargs["protocol"])
        return evaluate(vae, x, **kwargs)

    monkeypatch.setattr(compare_module, "evaluate", spy)
    config = TINY.replace(train={"epochs": 1}, data={"binarize": "threshold"})
    compare(["mvn_diag"], config, seeds=[3], data=data, nll_k=2, nll_images=4)
    assert protocols == [DataProtocol(data.name, "test", "threshold", None)]


def test_isolated_runs_match_in_process_runs_and_measure_memory(data):
    config = TINY.replace(train={"epochs": 1})
    isolated = compare(["mvn_diag"], config, seeds=[0], isolate=True, nll_k=10)
    in_process = compare(["mvn_diag"], config, seeds=[0], data=data, nll_k=10)
    assert isolated.runs[0].test_elbo == in_process.runs[0].test_elbo
    assert isolated.runs[0].nll == in_process.runs[0].nll
    assert isolated.isolated and isolated.runs[0].peak_memory_mib is not None
    assert isolated.runs[0].peak_memory_mib >= 0


def test_cli_compare(tmp_path, capsys):
    args = ["compare", "--guides", "mvn_diag,sylvester:2", "--seeds", "2", "--epochs", "1", "--n-train", "200"]
    args += ["--n-test", "50", "--batch-size", "100", "--hidden-dims", "32,16", "--latent-dim", "2", "--no-isolate"]
    args += ["--nll-k", "10", "--nll-images", "20"]
    assert cli.main([*args, "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[0] == "guide" and "sylvester:2" in out and "IS-NLL k=10" in out
    for name in ("compare.md", "compare.csv", "runs.csv", "compare.png", "config.json"):
        assert (tmp_path / "c" / name).is_file(), name
    assert cli.main([*args, "--out", str(tmp_path / "c")]) == 2  # an existing comparison is not overwritten
    assert "--overwrite" in capsys.readouterr().err


def test_cli_compare_unknown_guide(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "--guides", "mvn_diag,ful_rank"])
    assert exit_info.value.code == 2
    assert "did you mean 'full_rank'" in capsys.readouterr().err


def test_latent_posterior_plots_use_each_family_s_covariance():
    from matplotlib.collections import EllipseCollection, PathCollection

    from pyro_vae import VAE
    from pyro_vae.plotting import _marginal_covariance, latent_posteriors

    x = torch.rand(7, 784).bernoulli()
    labels = torch.arange(7)
    for guide in ("full_rank", "low_rank", "diag_normal"):
        vae = VAE(784, latent_dim=3, hidden_dims=(16,), guide=guide)
        q = vae.encode(x)
        covariance = _marginal_covariance(q, (0, 2))
        full = q.covariance_matrix if hasattr(q, "covariance_matrix") else torch.diag_embed(q.variance)
        torch.testing.assert_close(covariance, full[:, [0, 2]][:, :, [0, 2]])
        (ellipses,) = [
            c
            for c in latent_posteriors(vae, x, labels, dims=(0, 2)).axes[0].collections
            if isinstance(c, EllipseCollection)
        ]
        assert len(ellipses.get_offsets()) == 7
    flow = VAE(784, latent_dim=3, hidden_dims=(16,), guide="iaf")
    assert _marginal_covariance(flow.encode(x), (0, 1)) is None
    clouds = [
        c for c in latent_posteriors(flow, x, labels, n_samples=5).axes[0].collections if isinstance(c, PathCollection)
    ]
    assert sorted(len(c.get_offsets()) for c in clouds) == [7, 35]  # means, and 5 draws per image


def test_a_diverging_run_is_reported_and_the_others_go_on(data, monkeypatch, tmp_path):
    import pyro_vae.compare as compare_module
    from pyro_vae.errors import NonFiniteLossError

    def fit_or_diverge(vae, data, config, **kwargs):
        if config.model.guide == "full_rank" and config.train.seed == 1:
            raise NonFiniteLossError("non-finite loss (-inf) at optimiser step 3, first at guide site 'z'")
        return fit(vae, data, config, **kwargs)

    monkeypatch.setattr(compare_module, "fit", fit_or_diverge)
    config = TINY.replace(train={"epochs": 1})
    result = compare(["mvn_diag", "full_rank"], config, seeds=[0, 1], data=data, nll_k=None, out_dir=tmp_path)
    seed_row, full_rank = result.rows
    assert seed_row.diverged == 0 and full_rank.diverged == 1 and full_rank.seeds == 2
    (ok,) = [run for run in result.runs if run.guide == "full_rank" and run.failure is None]
    assert full_rank.test_elbo.mean == ok.test_elbo.mean and math.isnan(full_rank.test_elbo.se)
    assert "(1 of 2 runs diverged)" in result.table()
    markdown = (tmp_path / "compare.md").read_text()
    assert "full_rank, seed 1: non-finite loss (-inf)" in markdown


# ------------------------------------------------------------------------------------------ --vary any one option


def test_vary_the_likelihood_under_the_same_protocol(data, tmp_path):
    config = TINY.replace(train={"epochs": 1})
    result = compare(
        ["continuous_bernoulli", "bernoulli"], config, seeds=[0], field="likelihood", data=data, out_dir=tmp_path,
        nll_k=None,
    )  # fmt: skip
    assert [row.variant for row in result.rows] == ["continuous_bernoulli", "bernoulli"]
    assert result.field == "likelihood" and result.reference == "bernoulli"  # the field's default when compared
    assert result.rows[1].time_ratio == 1.0
    for run in result.runs:
        saved = json.loads((tmp_path / "runs" / f"{run.variant}-seed0" / "config.json").read_text())["config"]
        assert saved["model"]["likelihood"] == run.variant and saved["model"]["guide"] == "mvn_diag"
        assert run.shared_weights == run.num_weights  # same shapes: every initial weight is the first value's
    assert result.table().splitlines()[0].split()[:1] == ["likelihood"] and "× bernoulli" in result.table()
    assert result.to_markdown().startswith("# Likelihoods compared\n")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "compare.csv").read_text())))
    assert [r["likelihood"] for r in rows] == ["continuous_bernoulli", "bernoulli"]
    assert "time_ratio_to_bernoulli" in rows[0]
    manifest = json.loads((tmp_path / "config.json").read_text())
    assert manifest["vary"] == "likelihood" and manifest["values"] == ["continuous_bernoulli", "bernoulli"]
    assert "guides" not in manifest


def test_vary_the_objective_keeps_the_model_and_its_weights(data):
    config = TINY.replace(train={"epochs": 1})
    result = compare(["trace", "iwae:2"], config, seeds=[1], field="objective", data=data, nll_k=None)
    assert result.reference == "trace" and [row.variant for row in result.rows] == ["trace", "iwae:2"]
    assert all(run.shared_weights == run.num_weights for run in result.runs)
    assert result.rows[0].test_elbo.mean != result.rows[1].test_elbo.mean  # the objective did change the training


def test_shared_weights_count_what_matches_by_name_shape_and_value():
    from pyro_vae.compare import shared_weights

    first = initial_vae(TINY_MODEL, 784, seed=0)
    wide = initial_vae(dataclasses.replace(TINY_MODEL, likelihood="beta"), 784, seed=0)  # two numbers per pixel
    last = [m for m in wide.decoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    total = sum(p.numel() for p in wide.parameters())
    assert last.weight.shape[0] == 2 * 784
    assert shared_weights(wide, first) == total - last.weight.numel() - last.bias.numel()  # all but the last layer
    flow = initial_vae(dataclasses.replace(TINY_MODEL, guide="iaf:2"), 784, seed=0)
    head = flow.encoder.head
    family = sum(p.numel() for p in flow.family.parameters())
    assert shared_weights(flow, first) == sum(p.numel() for p in flow.parameters()) - head.weight.numel() - (
        head.bias.numel() + family
    )
    assert shared_weights(initial_vae(TINY_MODEL, 784, seed=1), first) == 0  # another seed shares nothing


def test_vary_refuses_an_option_it_cannot_vary_with_a_hint(data):
    with pytest.raises(ConfigError, match=r"unknown option to vary 'likelyhood'.*did you mean 'likelihood'"):
        compare(["bernoulli"], TINY, field="likelyhood", data=data)
    with pytest.raises(ConfigError, match="unknown option to vary 'seed'"):  # data, seed and budget stay shared
        compare(["1", "2"], TINY, field="seed", data=data)
    with pytest.raises(ConfigError, match=r"unknown likelihood 'bernouli'.*did you mean 'bernoulli'"):
        compare(["bernouli"], TINY, field="likelihood", data=data)


# ---------------------------------------------------------------------------------------------- load and timing


def test_under_load_means_more_runnable_threads_than_cpus():
    from pyro_vae.compare_report import under_load

    assert not under_load(2.0, 2) and under_load(2.01, 2)
    assert not under_load(None, 2) and not under_load(5.0, None)


def _loaded(variant, seed, seconds, before, after):
    return _run(variant, seed, -100.0, [seconds])._replace(load_before=before, load_after=after)


def test_timings_under_load_are_flagged_in_the_table():
    runs = [
        _loaded("mvn_diag", 0, 1.0, 0.5, 1.5),
        _loaded("mvn_diag", 1, 1.0, 1.0, 2.0),
        _loaded("iaf:2", 0, 2.0, 1.0, 3.5),  # another job started: more runnable threads than the 2 CPUs
        _loaded("iaf:2", 1, 2.0, 1.5, 1.0),
        _loaded("full_rank", 0, 3.0, 1.0, 1.0),
        _loaded("full_rank", 1, 3.0, 1.0, 1.0),
    ]
    values = ["mvn_diag", "iaf:2", "full_rank"]
    rows = summarise(values, runs, "mvn_diag", cpus=2)
    assert [(r.loaded, r.time_loaded) for r in rows] == [(0, False), (1, True), (0, False)]
    result = CompareResult(rows, runs, TINY, "d", False, None, "guide", 2, "mvn_diag")
    cells = {line.split()[0]: line for line in result.table().splitlines()[2:]}
    assert cells["iaf:2"].count(" *") == 2 and " *" not in cells["mvn_diag"] + cells["full_rank"]
    assert "exceeded the machine's 2 CPUs (1 of 6 runs)" in result.protocol()
    assert [r["under_load"] for r in csv.DictReader(io.StringIO(result.runs_csv()))] == ["0", "0", "1", "0", "0", "0"]
    # the reference itself under load taints every ratio, not the seconds of the others
    rows = summarise(values, [runs[2]._replace(variant="mvn_diag"), *runs[2:]], "mvn_diag", cpus=2)
    assert [r.time_loaded for r in rows] == [True, True, True] and [r.loaded for r in rows] == [1, 1, 0]
    quiet = CompareResult(summarise(["full_rank"], runs[4:], "mvn_diag", 8), runs[4:], TINY, "d", False, cpus=8)
    assert "stayed at or below the machine's 8 CPUs" in quiet.protocol() and "*" not in quiet.table()
    unknown = [run._replace(load_before=None, load_after=None) for run in runs]
    assert "load was not measured" in CompareResult(summarise(values, unknown), unknown, TINY, "d", False).protocol()


def test_compare_reads_the_load_around_every_run(data, monkeypatch):
    import pyro_vae.compare as compare_module

    loads = iter([0.5, 9.0, 1.0, 1.5])
    monkeypatch.setattr(compare_module, "machine_load", lambda: next(loads))
    monkeypatch.setattr(compare_module.os, "cpu_count", lambda: 4)
    result = compare(["mvn_diag", "diag_normal"], TINY.replace(train={"epochs": 1}), data=data, nll_k=None)
    assert [(run.load_before, run.load_after) for run in result.runs] == [(0.5, 9.0), (1.0, 1.5)]
    assert result.cpus == 4 and [row.loaded for row in result.rows] == [1, 0]
    assert [row.time_loaded for row in result.rows] == [True, True]


def test_cli_compare_varies_the_likelihood_and_guides_is_its_alias(tmp_path, capsys):
    from pyro_vae.cli.commands import _compare_variants

    parser = cli.build_parser()

    def variants(*argv):
        return _compare_variants(parser.parse_args(["compare", *argv]))[1:]

    alias = variants("--guides", "iaf:2,mvn_diag")
    assert alias == variants("--vary", "guide=iaf:2,mvn_diag") == ("guide", ["iaf:2", "mvn_diag"])
    assert variants() == ("guide", cli.DEFAULT_COMPARE_GUIDES.split(","))
    # grey-level likelihoods with --binarize none: the base config holds a compared value, not the default bernoulli
    config, field, values = _compare_variants(
        parser.parse_args(["compare", "--vary", "likelihood=beta,gaussian:learned", "--binarize", "none"])
    )
    assert (config.model.likelihood, field, values) == ("beta", "likelihood", ["beta", "gaussian:learned"])
    args = ["compare", "--vary", "likelihood=bernoulli,continuous_bernoulli", "--seeds", "1", "--epochs", "1"]
    args += ["--n-train", "100", "--n-test", "20", "--batch-size", "50", "--hidden-dims", "16", "--latent-dim", "2"]
    args += ["--no-isolate", "--nll-k", "0", "--no-figures", "--threads", "1"]
    assert cli.main([*args, "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["likelihood", "raw"] and "continuous_bernoulli" in out
    assert "likelihood compared" in out
