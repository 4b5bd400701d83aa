"""Mean ± SE against numpy/scipy in float64; pooled moments; eval_mode; the binarisation-seed rule; peak memory."""

import math
import mmap

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from pyro_vae._memory import PeakRSS, status_mib
from pyro_vae.config import BINARIZATIONS, DataConfig
from pyro_vae.data import binarize_eval
from pyro_vae.data.batches import binarization_seed
from pyro_vae.errors import ConfigError
from pyro_vae.evaluation import MeanSE as EvaluationMeanSE
from pyro_vae.importance import MeanSE as ImportanceMeanSE
from pyro_vae.networks import eval_mode
from pyro_vae.protocol import DataProtocol
from pyro_vae.stats import MeanSE, Moments, mean_se, moments, pool


@pytest.mark.parametrize("n", [2, 3, 17, 1000])
@pytest.mark.parametrize("offset", [0.0, -260.0, 1e8])
def test_mean_se_matches_numpy_and_scipy_sem(n, offset):
    """At an offset of 1e8 with unit spread a one-pass (sum of squares) form keeps no correct digit of the variance;
    the two-pass form keeps the SE to ~1e-8 relative (eps · offset / spread), so rel=1e-6 separates the two."""
    values = offset + np.random.default_rng(n).normal(size=n)
    result = mean_se(torch.from_numpy(values))
    assert result.mean == pytest.approx(values.mean(), rel=1e-15, abs=1e-12)
    assert result.se == pytest.approx(scipy_stats.sem(values), rel=1e-6)
    assert result.se == pytest.approx(values.std(ddof=1) / math.sqrt(n), rel=1e-6)


def test_mean_se_accepts_float32_tensors_lists_and_any_shape_in_float64():
    values = torch.tensor([[1.0, 2.0], [4.0, 7.0]], dtype=torch.float32)
    expected = (3.5, scipy_stats.sem([1.0, 2.0, 4.0, 7.0]))
    assert mean_se(values) == pytest.approx(expected, rel=1e-15)
    assert mean_se([1.0, 2.0, 4.0, 7.0]) == pytest.approx(expected, rel=1e-15)
    assert isinstance(mean_se(values).mean, float) and isinstance(mean_se(values).se, float)


def test_edges_one_value_has_no_se_and_no_values_have_nothing():
    one = mean_se([3.0])
    assert one.mean == 3.0 and math.isnan(one.se)
    none = mean_se([])
    assert math.isnan(none.mean) and math.isnan(none.se)
    assert str(MeanSE(1.234, 0.5)) == "1.23 ± 0.50"


def test_meanse_has_one_home_and_is_re_exported():
    assert EvaluationMeanSE is MeanSE and ImportanceMeanSE is MeanSE


@pytest.mark.parametrize("sizes", [(5, 7), (1, 1, 9), (0, 4, 1), (3,)])
def test_pooled_groups_equal_the_union(sizes):
    """Chan's pooling of groups (what the distributed reduction does across ranks) equals one pass over the union,
    also for groups of one value (no spread of their own) and empty groups."""
    rng = np.random.default_rng(sum(sizes))
    groups = [1e6 + rng.normal(size=size) for size in sizes]
    union = np.concatenate(groups)
    pooled = pool(moments(g) for g in groups)
    assert pooled.count == union.size
    assert pooled.mean == pytest.approx(union.mean(), rel=1e-15)
    assert pooled.m2 == pytest.approx(((union - union.mean()) ** 2).sum(), rel=1e-8)
    via_mean_se = pool(Moments.from_mean_se(mean_se(g), g.size) for g in groups)
    assert via_mean_se.mean_se() == pytest.approx(mean_se(union), rel=1e-8)
    if union.size > 1:
        assert pooled.mean_se().se == pytest.approx(scipy_stats.sem(union), rel=1e-8)


def test_pooling_nothing_is_empty():
    empty = pool([])
    assert empty.count == 0 and math.isnan(empty.mean_se().mean)


def _frozen_submodule_model():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    model.train()
    model[1].eval()  # a submodule the user froze on purpose
    return model


def test_eval_mode_restores_every_submodule_flag():
    model = _frozen_submodule_model()
    other = torch.nn.Linear(1, 1)
    with eval_mode(model, other):
        assert not any(m.training for m in (*model.modules(), other))
    assert [m.training for m in model.modules()] == [True, True, False, True] and other.training


def test_eval_mode_restores_on_exception_and_leaves_eval_models_in_eval():
    model = _frozen_submodule_model()
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, True]
    model.eval()
    with eval_mode(model):
        pass
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("binarize", BINARIZATIONS)
def test_a_binarisation_seed_is_recorded_exactly_when_the_binarisation_draws(binarize):
    """The rule is checked against what binarize_eval does: the split changes with the seed iff a seed is recorded."""
    x = torch.rand(64, 10, generator=torch.Generator().manual_seed(0))
    depends_on_seed = not torch.equal(binarize_eval(x, binarize, 0), binarize_eval(x, binarize, 1))
    assert (binarization_seed(binarize, 7) is not None) == depends_on_seed
    assert binarization_seed(binarize, 7) in (None, 7)
    protocol = DataProtocol.from_config(DataConfig(binarize=binarize), 7, dataset="d")
    assert protocol == DataProtocol("d", "test", binarize, binarization_seed(binarize, 7))


def test_an_unknown_binarisation_is_refused():
    with pytest.raises(ConfigError, match="binarization"):
        binarization_seed("dinamic", 0)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_rss_sees_a_block_that_touches_memory():
    """64 MiB written page by page must show up as resident-set growth (at least 48 MiB), and the figure is None-free
    on Linux. The block is a fresh anonymous mapping, not a tensor: after a long test session the allocator may hand
    a tensor pages that are already resident (freed, not returned), which no RSS figure can see (the whole suite
    showed a growth of 0 for ``torch.ones(16 * 2**20)``)."""
    size = 64 * 2**20
    with PeakRSS() as memory:
        block = mmap.mmap(-1, size)
        block.write(b"\1" * size)  # every page written
        block.close()
    assert memory.peak_mib is not None and memory.peak_mib >= 48
    assert status_mib("VmRSS") > 0
    with pytest.raises(OSError, match="no VmNothing"):
        status_mib("VmNothing")
