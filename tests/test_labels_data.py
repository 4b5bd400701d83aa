"""The data layer of labelled training (issue 14, part 1): label checks, the labelled subset, labelled batches.

References are written out here from the documented rules (seed tags, draw order), independently of the code.
"""

import contextlib

import numpy as np
import pytest
import torch

from pyro_vae.config import DataConfig
from pyro_vae.data import (
    Batch,
    Dataset,
    EpochBatches,
    LabelledSplit,
    MixedBatches,
    derive_seed,
    labels_fingerprint,
    load_dataset,
    num_classes,
    select_labelled,
    split_labelled,
)
from pyro_vae.errors import ConfigError, DataError

BINARIZATIONS = ["dynamic", "static", "threshold", "none"]


@contextlib.contextmanager
def raises_one_line(error, *words):
    """Expect an ``error`` whose message is one line containing every word."""
    with pytest.raises(error) as info:
        yield info
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def toy(y_train, y_test, *, class_names=None, d=3) -> Dataset:
    """A hand-built data set with the given labels (``None``: unlabelled) and random images."""
    g = torch.Generator().manual_seed(0)
    n, m = (len(y) if y is not None else 5 for y in (y_train, y_test))
    as_labels = lambda y: None if y is None else torch.as_tensor(y, dtype=torch.int64)  # noqa: E731
    return Dataset(
        name="toy",
        x_train=torch.rand(n, d, generator=g),
        y_train=as_labels(y_train),
        x_test=torch.rand(m, d, generator=g),
        y_test=as_labels(y_test),
        image_shape=None,
        binary=False,
        class_names=class_names,
    )


def rng_untouched(fn):
    """Run ``fn()`` and check that torch's global RNG was not consumed; return what ``fn`` returned."""
    before = torch.get_rng_state()
    out = fn()
    assert torch.equal(torch.get_rng_state(), before), "the global torch RNG was consumed"
    return out


def assert_batches_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.epoch, a.step) == (b.epoch, b.step)
        for name in ("index", "x", "y"):
            u, v = getattr(a, name), getattr(b, name)
            assert (u is None and v is None) or torch.equal(u, v), name
        assert (a.labelled is None) == (b.labelled is None)
        if a.labelled is not None:
            assert_batches_equal([a.labelled], [b.labelled])


# ----------------------------------------------------------------------------------------------------- num_classes


def test_num_classes_counts_class_names_or_the_largest_label():
    assert num_classes(toy([0, 1, 2, 1], [2, 0])) == 3
    # A class the test split lacks is fine, one above the largest label is not guessed.
    assert num_classes(toy([0, 1, 2, 3], [0, 0])) == 4
    assert num_classes(toy([0, 1, 2], [1], class_names=("a", "b", "c"))) == 3


def test_num_classes_of_the_built_in_and_npz_sources(tmp_path):
    embedded = load_dataset(DataConfig(n_train=200, n_test=50))
    assert num_classes(embedded) == 10 == len(embedded.class_names)
    g = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        x=g.integers(0, 256, (12, 2, 2), dtype=np.uint8),
        y=np.arange(12) % 3,
        x_test=g.integers(0, 256, (3, 2, 2), dtype=np.uint8),
        y_test=np.arange(3),
        classes=np.array(["cat", "dog", "eel"]),
    )
    data = load_dataset(DataConfig(dataset="npz", path=str(tmp_path / "d.npz")))
    assert num_classes(data) == 3 and data.class_names == ("cat", "dog", "eel")


@pytest.mark.parametrize(
    "data, words",
    [
        (toy(None, None), ["toy", "has no labels", "--model cvae/m2 need labels", "y (and y_test)"]),
        (toy([0, 1], None), ["no", "test", "test accuracy", "give y_test"]),
        (toy([0, -1, 1], [0]), ["label -1", "training split", "0..C-1", "numpy.unique(y, return_inverse=True)"]),
        (toy([0, 1, 2], [3], class_names=("a", "b", "c")), ["label 3", "test split", "3 classes", "numpy.unique"]),
        (toy([0, 0], [0]), ["single class", "at least 2 classes"]),
        (toy([0, 2, 3], [1]), ["class 1", "no training image", "numpy.unique"]),
        (toy([0, 2], [0], class_names=("a", "b", "c")), ["class 1 ('b')", "no training image"]),
        (toy([0, 3], [0]), ["class 1", "nor of 1 more", "4 classes"]),
    ],
)
def test_num_classes_refuses_unusable_labels_in_one_line(data, words):
    with raises_one_line(DataError, *words):
        num_classes(data)


def test_num_classes_names_the_data_as_asked():
    with raises_one_line(DataError, "the npz file (toy) has no labels"):
        num_classes(toy(None, None), what="the npz file")


# ------------------------------------------------------------------------------------------------- select_labelled


def labels_with_counts(counts, seed=0):
    """Shuffled labels with ``counts[c]`` images of class ``c``."""
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("n", [4, 10, 23, 40])
def test_selection_is_balanced_sorted_and_distinct(n):
    y = labels_with_counts([10, 12, 15, 30])
    index = rng_untouched(lambda: select_labelled(y, n, 4, seed=5))
    assert index.dtype == torch.int64 and index.device.type == "cpu" and index.shape == (n,)
    assert torch.equal(index, index.unique())  # unique() sorts: ascending and no repeats
    assert 0 <= int(index.min()) and int(index.max()) < len(y)
    per_class = torch.bincount(y[index], minlength=4)
    assert per_class.sum() == n
    # Balanced: n // C each, and exactly n % C classes one more.
    assert set(per_class.tolist()) <= {n // 4, n // 4 + 1}
    assert int((per_class == n // 4 + 1).sum()) == n % 4


def test_selection_follows_the_documented_draws():
    # Written out from the docstring: one CPU generator seeded by derive_seed("labelled", seed) draws the classes
    # that get one more (a permutation of 0..C-1, its first n % C), then a permutation of each class's ascending
    # positions, class 0 first, whose first `share` entries are kept.
    y = labels_with_counts([9, 7, 11], seed=2)
    n, c, seed = 8, 3, 11
    g = torch.Generator().manual_seed(derive_seed("labelled", seed))
    extra = torch.randperm(c, generator=g)[: n % c].tolist()
    want = []
    for k in range(c):
        positions = torch.tensor([i for i, label in enumerate(y.tolist()) if label == k])
        share = n // c + (k in extra)
        want += positions[torch.randperm(len(positions), generator=g)[:share]].tolist()
    assert select_labelled(y, n, c, seed).tolist() == sorted(want)


def test_selection_is_a_pure_seeded_function():
    y = labels_with_counts([50, 50, 50, 50])
    y_before = y.clone()
    a = select_labelled(y, 10, 4, seed=0)
    assert torch.equal(a, select_labelled(y, 10, 4, seed=0))
    assert torch.equal(y, y_before)
    # Another seed chooses other images (a deterministic check: 10 of 200 images agreeing by chance is ~1e-16)...
    assert not torch.equal(a, select_labelled(y, 10, 4, seed=1))
    # ... and, over seeds, other classes get the extra image (not always the first ones).
    extras = {
        tuple((torch.bincount(y[select_labelled(y, 10, 4, seed=s)]) == 3).nonzero().flatten().tolist())
        for s in range(12)
    }
    assert len(extras) > 1


def test_selection_on_the_embedded_data_keeps_a_label_for_every_class():
    data = load_dataset(DataConfig(n_train=1000, n_test=10))
    index = select_labelled(data.y_train, 100, num_classes(data), seed=0)
    assert torch.equal(torch.bincount(data.y_train[index], minlength=10), torch.full((10,), 10))


@pytest.mark.parametrize(
    "n, words",
    [
        (3, ["--labelled 3", "below the 4 classes", "at least the number of classes C", "--labelled 4 or more"]),
        (61, ["--labelled 61 exceeds the 60 training images", "--labelled 60 or less"]),
        (30, ["class 0 has 5 training images", "each of the 4 classes 7 or 8", "lower --labelled to 20 or less"]),
    ],
)
def test_selection_refuses_impossible_sizes_in_one_line(n, words):
    y = labels_with_counts([5, 15, 20, 20])
    with raises_one_line(DataError, *words):
        select_labelled(y, n, 4, seed=0)


def test_the_suggested_largest_selection_works():
    y = labels_with_counts([5, 15, 20, 20])
    index = select_labelled(y, 20, 4, seed=0)  # the largest the message above suggests: 4 classes × 5
    assert torch.equal(torch.bincount(y[index]), torch.full((4,), 5))


def test_selection_refuses_bad_arguments():
    y = labels_with_counts([5, 5])
    with raises_one_line(ConfigError, "labelled must be a positive integer", "2.0"):
        select_labelled(y, 2.0, 2, seed=0)
    with raises_one_line(ConfigError, "num_classes must be an integer >= 2"):
        select_labelled(y, 2, 1, seed=0)
    with raises_one_line(DataError, "label 2", "0..C-1"):
        select_labelled(labels_with_counts([5, 5, 5]), 4, 2, seed=0)
    with raises_one_line(DataError, "y_train is a torch.float32 tensor", "int64"):
        select_labelled(y.float(), 4, 2, seed=0)


# ---------------------------------------------------------------------------------------------- labels_fingerprint


def test_labels_fingerprint_changes_with_one_label_or_one_position():
    y = labels_with_counts([4, 4, 4])
    index = torch.tensor([0, 3, 7])
    base = labels_fingerprint(y, index)
    assert len(base) == 64 and int(base, 16) >= 0
    assert labels_fingerprint(y.clone(), index.clone()) == base
    changed = y.clone()
    changed[5] = (changed[5] + 1) % 3
    assert labels_fingerprint(changed, index) != base
    assert labels_fingerprint(y, torch.tensor([0, 3, 8])) != base
    assert labels_fingerprint(y) != base and labels_fingerprint(y) == labels_fingerprint(y.clone())
    assert labels_fingerprint(y) != labels_fingerprint(changed)


# ------------------------------------------------------------------------------------------- EpochBatches(y=...)


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(1)
    return torch.rand(41, 5, generator=g), torch.randint(0, 3, (41,), generator=g)


def test_batch_defaults_keep_old_users_working():
    batch = Batch(torch.arange(2), torch.zeros(2, 3), 0, 1)
    assert batch.y is None and batch.labelled is None
    assert batch == Batch(index=batch.index, x=batch.x, epoch=0, step=1, y=None, labelled=None)


@pytest.mark.parametrize("binarize", BINARIZATIONS)
@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_epoch_batches_with_labels_give_the_same_images(xy, binarize, rank, world_size):
    x, y = xy
    kwargs = dict(batch_size=6, seed=3, binarize=binarize, rank=rank, world_size=world_size)
    plain = list(EpochBatches(x, **kwargs).batches(2))
    labelled = list(EpochBatches(x, y=y, **kwargs).batches(2))
    assert_batches_equal([b._replace(y=None) for b in labelled], plain)
    for b in labelled:
        assert b.y.dtype == torch.int64 and torch.equal(b.y, y[b.index]) and b.labelled is None


def test_epoch_batches_binarise_as_documented(xy):
    # The refactoring into one Binarizer must not move a pixel: the module docstring's seeds, written out.
    x, _ = xy
    static = torch.bernoulli(x, generator=torch.Generator().manual_seed(derive_seed("static", 3)))
    for b in EpochBatches(x, batch_size=6, seed=3, binarize="static").batches(1):
        assert torch.equal(b.x, static[b.index])
    for b in EpochBatches(x, batch_size=6, seed=3, binarize="dynamic").batches(1):
        g = torch.Generator().manual_seed(derive_seed("dynamic", 3, 1, b.step, 0))
        assert torch.equal(b.x, torch.bernoulli(x[b.index], generator=g))


@pytest.mark.parametrize(
    "y, words",
    [
        (torch.zeros(40, dtype=torch.int64), ["shape (40,)", "shape (41,)"]),
        (torch.zeros(41), ["torch.float32", "int64"]),
        (np.zeros(41, dtype=np.int64), ["ndarray", "torch.as_tensor(y, dtype=torch.int64)"]),
    ],
)
def test_epoch_batches_refuse_labels_that_do_not_fit(xy, y, words):
    with raises_one_line(DataError, *words):
        EpochBatches(xy[0], batch_size=4, seed=0, binarize="none", y=y)


# ------------------------------------------------------------------------------------------------- split_labelled


def test_split_is_disjoint_ordered_and_complete():
    data = toy([0, 1, 2, 0, 1, 2, 0], [0])
    index = torch.tensor([1, 4, 5])
    split = split_labelled(data, index)
    assert isinstance(split, LabelledSplit)
    assert torch.equal(split.x_labelled, data.x_train[[1, 4, 5]])
    assert torch.equal(split.y_labelled, data.y_train[[1, 4, 5]])
    assert torch.equal(split.x_unlabelled, data.x_train[[0, 2, 3, 6]])
    assert torch.equal(split.labelled_index, index)
    everything = split_labelled(data, torch.arange(7))
    assert everything.x_unlabelled.shape == (0, 3) and torch.equal(everything.x_labelled, data.x_train)


@pytest.mark.parametrize(
    "index, words",
    [
        (torch.tensor([1, 7]), ["positions 1..7", "7 images (0..6)", "select_labelled"]),
        (torch.tensor([-1, 2]), ["positions -1..2"]),
        (torch.tensor([2, 2]), ["names an image twice"]),
        (torch.tensor([1.0]), ["the labelled index is a torch.float32 tensor"]),
    ],
)
def test_split_refuses_a_bad_index(index, words):
    with raises_one_line(DataError, *words):
        split_labelled(toy([0, 1, 2, 0, 1, 2, 0], [0]), index)
    with raises_one_line(DataError, "no labels"):
        split_labelled(toy(None, None), torch.tensor([0]))


# --------------------------------------------------------------------------------------------------- MixedBatches


N_U, N_L, DIM = 30, 7, 4


@pytest.fixture
def mixed_data():
    g = torch.Generator().manual_seed(2)
    return (
        torch.rand(N_U, DIM, generator=g),
        torch.rand(N_L, DIM, generator=g),
        torch.randint(0, 3, (N_L,), generator=g),
    )


def mixed(data, **kwargs):
    options = dict(batch_size=3, labelled_batch=3, seed=4, binarize="none") | kwargs
    return MixedBatches(*data, **options)


@pytest.mark.parametrize("binarize", BINARIZATIONS)
def test_the_unlabelled_part_is_exactly_epoch_batches(mixed_data, binarize):
    loader = mixed(mixed_data, batch_size=4, binarize=binarize)
    steps = list(loader.batches(1))
    plain = list(EpochBatches(mixed_data[0], batch_size=4, seed=4, binarize=binarize).batches(1))
    assert len(loader) == loader.len_per_epoch() == len(plain) == 8
    assert loader.num_images == N_U and loader.num_labelled == N_L
    assert_batches_equal([b._replace(labelled=None) for b in steps], plain)
    covered = torch.cat([b.index for b in steps])
    assert torch.equal(covered.sort().values, torch.arange(N_U))  # every unlabelled image once
    for b in steps:
        assert b.y is None and b.labelled.step == b.step and b.labelled.epoch == 1
        assert b.labelled.index.shape == (3,) and torch.equal(b.labelled.y, mixed_data[2][b.labelled.index])


def test_labelled_positions_follow_the_documented_stream(mixed_data):
    # Ten steps of 3 labelled images are 30 stream positions: permutations 0..3 (7 positions each) and two of
    # permutation 4. Each cycle of 7 covers every labelled image once.
    loader = mixed(mixed_data)
    positions = torch.cat([b.labelled.index for b in loader.batches(5)])
    assert len(positions) == 30
    for k in range(5):
        g = torch.Generator().manual_seed(derive_seed("labelled-order", 4, 5, k))
        cycle = torch.randperm(N_L, generator=g)
        assert torch.equal(positions[7 * k : 7 * (k + 1)], cycle[: len(positions[7 * k : 7 * (k + 1)])])
    for k in range(4):
        assert torch.equal(positions[7 * k : 7 * (k + 1)].sort().values, torch.arange(N_L))
    assert torch.equal(loader.labelled_positions(5, 4), positions[12:15])
    other = torch.cat([b.labelled.index for b in loader.batches(6)])
    assert not torch.equal(positions, other)  # every epoch draws its own stream


@pytest.mark.parametrize("binarize", BINARIZATIONS)
def test_resume_mid_epoch_is_bit_exact(mixed_data, binarize):
    full = rng_untouched(lambda: list(mixed(mixed_data, binarize=binarize).batches(2)))
    for start in (0, 1, 4, 9, 10):
        assert_batches_equal(list(mixed(mixed_data, binarize=binarize).batches(2, start=start)), full[start:])
    with raises_one_line(ConfigError, "start must be at most 10"):
        mixed(mixed_data).batches(2, start=11)


def test_labelled_images_are_binarised_with_their_own_draws(mixed_data):
    x_u, x_l, y_l = mixed_data
    for b in mixed(mixed_data, binarize="dynamic").batches(3):
        g = torch.Generator().manual_seed(derive_seed("dynamic-labelled", 4, 3, b.step, 0))
        assert torch.equal(b.labelled.x, torch.bernoulli(x_l[b.labelled.index], generator=g))
    static = torch.bernoulli(x_l, generator=torch.Generator().manual_seed(derive_seed("static-labelled", 4)))
    for b in mixed(mixed_data, binarize="static").batches(3):
        assert torch.equal(b.labelled.x, static[b.labelled.index])
    for b in mixed(mixed_data, binarize="threshold", threshold=0.3).batches(3):
        assert torch.equal(b.labelled.x, (x_l[b.labelled.index] > 0.3).float())
    for b in mixed(mixed_data, binarize="none").batches(3):
        assert torch.equal(b.labelled.x, x_l[b.labelled.index])


@pytest.mark.parametrize("binarize", ["dynamic", "static"])
def test_labelled_and_unlabelled_noise_differ(binarize):
    # The same grey images (all 0.5) in both sets: any difference in the binarised pixels is the draw. Independent
    # draws agree on all 3 × 4 = 12 pixels of a step with probability 2**-12, so shared noise would show as equal
    # steps and independent noise (fixed seeds, so this is deterministic) leaves none of the 10 equal.
    grey = torch.full((N_U, DIM), 0.5)
    loader = MixedBatches(
        grey, grey[:N_L], torch.zeros(N_L, dtype=torch.int64), batch_size=3, labelled_batch=3, seed=0, binarize=binarize
    )
    again = list(
        MixedBatches(
            grey,
            grey[:N_L],
            torch.zeros(N_L, dtype=torch.int64),
            batch_size=3,
            labelled_batch=3,
            seed=0,
            binarize=binarize,
        ).batches(0)
    )
    steps = list(loader.batches(0))
    assert_batches_equal(steps, again)  # reproducible
    differ = [not torch.equal(b.x, b.labelled.x) for b in steps]
    assert sum(differ) == len(steps)


def test_two_ranks_share_out_both_streams(mixed_data):
    ranks = [mixed(mixed_data, rank=r, world_size=2) for r in (0, 1)]
    one = mixed(mixed_data, labelled_batch=6)  # one process taking both ranks' labelled positions
    assert len(ranks[0]) == len(ranks[1]) == 5
    steps = [list(loader.batches(1)) for loader in ranks]
    shards = [torch.cat([b.index for b in rank]) for rank in steps]
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(N_U))
    for s, (a, b) in enumerate(zip(*steps, strict=True)):
        # Rank r takes every 2nd of the step's 6 stream positions from the r-th: the positions are disjoint (the
        # images may repeat where the 6 positions straddle two permutations of the 7 images).
        together = one.labelled_positions(1, s)
        assert torch.equal(a.labelled.index, together[0::2]) and torch.equal(b.labelled.index, together[1::2])


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(labelled_batch=0), ConfigError, ["labelled_batch must be a positive integer"]),
        (dict(labelled_batch=8), DataError, ["labelled batch 8 exceeds the 7 labelled images", "--labelled"]),
        (dict(batch_size=31), DataError, ["batch size 31 exceeds the 30 unlabelled", "--batch-size 30 or less"]),
        (dict(binarize="dymanic"), ConfigError, ["unknown binarization", "dynamic"]),
        (dict(rank=2, world_size=2), ConfigError, ["rank must be at most 1"]),
    ],
)
def test_mixed_batches_refuse_bad_sizes_in_one_line(mixed_data, kwargs, error, words):
    with raises_one_line(error, *words):
        mixed(mixed_data, **kwargs)


def test_mixed_batches_refuse_sets_that_do_not_fit(mixed_data):
    x_u, x_l, y_l = mixed_data
    with raises_one_line(DataError, "no unlabelled images", "fewer labelled images (--labelled)"):
        MixedBatches(x_u[:0], x_l, y_l, batch_size=3, labelled_batch=3, seed=0, binarize="none")
    with raises_one_line(DataError, "x_labelled holds 3 values per image", "x_unlabelled 4"):
        MixedBatches(x_u, x_l[:, :3], y_l, batch_size=3, labelled_batch=3, seed=0, binarize="none")
    with raises_one_line(DataError, "y_labelled", "shape (7,)"):
        MixedBatches(x_u, x_l, y_l[:6], batch_size=3, labelled_batch=3, seed=0, binarize="none")


def test_from_a_labelled_npz_to_mixed_batches(tmp_path):
    g = np.random.default_rng(3)
    np.savez(tmp_path / "d.npz", x=g.integers(0, 256, (40, 3, 3), dtype=np.uint8), y=np.arange(40) % 4)
    data = load_dataset(DataConfig(dataset="npz", path=str(tmp_path / "d.npz"), test_fraction=0.25))
    c = num_classes(data)
    index = select_labelled(data.y_train, 8, c, seed=1)
    split = split_labelled(data, index)
    assert split.x_labelled.shape == (8, 9) and split.x_unlabelled.shape == (22, 9)
    loader = MixedBatches(
        split.x_unlabelled,
        split.x_labelled,
        split.y_labelled,
        batch_size=5,
        labelled_batch=2,
        seed=1,
        binarize="dynamic",
    )
    steps = list(loader.batches(0))
    assert len(steps) == 5 and all(torch.equal(b.labelled.y, data.y_train[index][b.labelled.index]) for b in steps)
    assert labels_fingerprint(data.y_train, index) != labels_fingerprint(
        data.y_train, select_labelled(data.y_train, 8, c, seed=2)
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_labelled_batches_on_cuda_stay_on_the_device_and_resume(mixed_data):
    cuda = tuple(t.cuda() for t in mixed_data)
    x_u, x_l, y_l = cuda
    for b in EpochBatches(x_u, batch_size=4, seed=0, binarize="dynamic", y=torch.arange(N_U).cuda()).batches(0):
        assert b.y.is_cuda and torch.equal(b.y, b.index)
    for binarize in ("dynamic", "static"):
        full = list(mixed(cuda, binarize=binarize).batches(1))
        assert all(t.is_cuda for b in full for t in (b.x, b.index, b.labelled.x, b.labelled.index, b.labelled.y))
        assert_batches_equal(list(mixed(cuda, binarize=binarize).batches(1, start=4)), full[4:])
        assert torch.equal(
            torch.cat([b.labelled.index for b in full]).cpu(),
            torch.cat([b.labelled.index for b in mixed(mixed_data, binarize=binarize).batches(1)]),
        )  # same order as on the CPU
    data = toy([0, 1, 2, 0, 1, 2], [0])
    data = Dataset(**{**vars(data), "x_train": data.x_train.cuda(), "y_train": data.y_train.cuda()})
    split = split_labelled(data, select_labelled(data.y_train, 3, num_classes(data), seed=0))
    assert split.x_labelled.is_cuda and split.y_labelled.is_cuda and split.x_unlabelled.is_cuda
