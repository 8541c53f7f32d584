"""bio_ext.benchmark.data: sizes, splits, normalization, file parsing and errors of every dataset."""

import gzip
import logging
import os
import pickle
import random
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bio_ext.benchmark.data import (CIFAR10_FILES, CIFAR10_MEAN, CIFAR10_STD, DATASETS, MNIST_FILES, DataBundle,
                                    RandomCropFlip, available_datasets, load_dataset)
from bio_ext.errors import ConfigError, DataNotFoundError, InvalidOptionError, UnknownNameError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
NO_SHARED = f"real data folder {SHARED.resolve()} absent (CI and dev machines have it as ../shared/data)"
CIFAR_ROOT = os.environ.get("BIO_EXT_CIFAR10_ROOT") or (
    str(SHARED) if (SHARED / "cifar-10-batches-py" / "test_batch").is_file() else None)
NO_CIFAR = ("no built CIFAR-10 pickles: run `python ../shared/data/cifar10-jpeg/build_cifar10.py OUT_DIR` and set "
            "BIO_EXT_CIFAR10_ROOT=OUT_DIR")


def _need(name):
    if name in ("mnist", "fashion_mnist") and not SHARED.is_dir():
        pytest.skip(NO_SHARED)
    if name == "cifar10" and CIFAR_ROOT is None:
        pytest.skip(NO_CIFAR)
    return {"mnist": None, "fashion_mnist": None, "cifar10": CIFAR_ROOT}.get(name)


# name -> (train examples before holdout, test examples, input shape, classes, per-class train counts, test counts)
KNOWN = {
    "digits": (1437, 360, (1, 8, 8), 10, None, None),
    "synthetic": (512, 256, (16,), 4, None, None),
    "mnist": (60000, 10000, (1, 28, 28), 10,
              [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
              [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
    "fashion_mnist": (60000, 10000, (1, 28, 28), 10, [6000] * 10, [1000] * 10),
    "cifar10": (50000, 10000, (3, 32, 32), 10, [5000] * 10, [1000] * 10),
}


def test_registry_lists_every_dataset():
    assert available_datasets() == sorted(KNOWN) == sorted(DATASETS)


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_dataset_has_exact_sizes_shapes_dtypes_and_label_ranges(name):
    root = _need(name)
    n_train, n_test, shape, classes, train_counts, test_counts = KNOWN[name]
    b = load_dataset(name, root, val_fraction=0.1, seed=0)
    assert isinstance(b, DataBundle) and b.name == name
    assert b.input_shape == shape and b.num_classes == classes
    assert len(b.val) == round(0.1 * n_train) and len(b.train) == n_train - len(b.val) and len(b.test) == n_test
    for split in (b.train, b.val, b.test):
        x, y = split[0]
        assert x.dtype == torch.float32 and tuple(x.shape) == shape
        assert y.dtype == torch.int64 and y.dim() == 0
        assert split.y.min() >= 0 and split.y.max() == classes - 1
    if train_counts is not None:
        all_train = torch.cat([b.train.y, b.val.y])
        assert torch.bincount(all_train, minlength=classes).tolist() == train_counts
        assert torch.bincount(b.test.y, minlength=classes).tolist() == test_counts


@pytest.mark.parametrize("name,mean,std", [("mnist", 0.1307, 0.3081), ("fashion_mnist", 0.2860, 0.3530)])
def test_mnist_like_pixels_are_the_standard_normalization_of_bytes(name, mean, std):
    _need(name)
    b = load_dataset(name, val_fraction=0)
    raw = b.train.x * std + mean                      # back to [0, 1]
    assert torch.allclose(raw * 255, (raw * 255).round(), atol=1e-3)   # exactly byte values
    assert raw.min().abs() < 1e-5 and (raw.max() - 1).abs() < 1e-5
    assert abs(b.train.x.mean().item()) < 0.01 and abs(b.train.x.std().item() - 1) < 0.01


def test_digits_is_sklearn_80_20_stratified_split_scaled_then_standardized_with_train_stats():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    idx_tr, idx_te = train_test_split(list(range(1797)), test_size=0.2, stratify=d.target, random_state=0)
    raw = torch.tensor(d.data, dtype=torch.float32) / 16
    m, s = raw[idx_tr].mean(), raw[idx_tr].std()
    for seed in (0, 5):   # the test split does not depend on the seed
        b = load_dataset("digits", seed=seed, val_fraction=0)
        assert torch.allclose(b.test.x.reshape(360, 64), (raw[idx_te] - m) / s, atol=1e-5)
        assert torch.allclose(b.train.x.reshape(1437, 64), (raw[idx_tr] - m) / s, atol=1e-5)
        assert b.test.y.tolist() == d.target[idx_te].tolist()
    assert abs(b.train.x.mean().item()) < 1e-5 and abs(b.train.x.std().item() - 1) < 1e-4
    assert all(abs(c - 36) <= 1 for c in torch.bincount(b.test.y).tolist())


def _row_index(sub, full):
    """Index in ``full`` of each example of ``sub`` (each must occur exactly)."""
    a, b = sub.reshape(len(sub), -1), full.reshape(len(full), -1)
    idx = torch.cdist(a, b).argmin(1)
    assert torch.equal(b[idx], a)
    return idx


@pytest.mark.parametrize("name,seed,frac", [("digits", 0, 0.1), ("digits", 3, 0.25), ("synthetic", 3, 0.25),
                                            ("mnist", 3, 0.25), ("cifar10", 0, 0.1)])
def test_holdout_is_biotorch_random_sample_and_train_keeps_original_order(name, seed, frac):
    root = _need(name)
    full = load_dataset(name, root, val_fraction=0)
    assert full.val is None
    b = load_dataset(name, root, val_fraction=frac, seed=seed)
    n = len(full.train)
    random.seed(seed)                                            # biotorch CIFAR10Benchmark's recipe
    val_idx = random.sample(range(0, n), round(frac * n))
    rest = sorted(set(range(n)) - set(val_idx))                  # np.delete keeps the order
    assert torch.equal(b.val.x, full.train.x[val_idx]) and torch.equal(b.val.y, full.train.y[val_idx])
    assert torch.equal(b.train.x, full.train.x[rest]) and torch.equal(b.train.y, full.train.y[rest])
    assert torch.equal(b.test.x, full.test.x)


def test_same_seed_same_split_different_seed_different_split():
    a, b, c = (load_dataset("digits", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.val.x, c.val.x)
    assert len(a.val) == len(c.val)


def test_limit_keeps_a_deterministic_ordered_subset_of_train_only():
    full = load_dataset("digits", seed=4)
    a, b = load_dataset("digits", seed=4, limit=100), load_dataset("digits", seed=4, limit=100)
    assert len(a.train) == 100 and torch.equal(a.train.x, b.train.x)
    rows = _row_index(a.train.x, full.train.x)
    assert (rows.diff() > 0).all()
    assert torch.equal(a.val.x, full.val.x) and torch.equal(a.test.x, full.test.x)
    whole = load_dataset("digits", val_fraction=0).train.x
    r4, r5 = (_row_index(load_dataset("digits", seed=s, limit=100, val_fraction=0).train.x, whole) for s in (4, 5))
    assert len(r4) == len(r5) == 100 and not torch.equal(r4, r5)
    assert len(load_dataset("digits", limit=10 ** 6).train) == len(full.train)


def test_test_limit_keeps_the_first_test_examples_and_nothing_else():
    full, cut = load_dataset("digits", seed=4), load_dataset("digits", seed=4, test_limit=50)
    assert torch.equal(cut.test.x, full.test.x[:50]) and torch.equal(cut.test.y, full.test.y[:50])
    assert torch.equal(cut.train.x, full.train.x) and torch.equal(cut.val.x, full.val.x)
    with pytest.raises(InvalidOptionError, match="test_limit=0"):
        load_dataset("digits", test_limit=0)


def test_flatten_gives_flat_examples_and_shape():
    b = load_dataset("digits", flatten=True)
    assert b.input_shape == (64,) and tuple(b.train[0][0].shape) == (64,) and tuple(b.test.x.shape) == (360, 64)
    img = load_dataset("digits")
    assert torch.equal(b.train.x, img.train.x.reshape(len(img.train), 64))


# ----------------------------------------------------------------------------- file parsing on hand-made files

def _write_idx(path, data: torch.Tensor, magic):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(">" + "I" * data.dim(), *data.shape))
        f.write(bytes(data.flatten().tolist()))


def _fake_mnist(folder, n_train=5, n_test=3, image_magic=2051):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    xtr = torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8)
    xte = torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8)
    ytr, yte = torch.arange(n_train) % 10, torch.arange(n_test) % 10
    for name, data, magic in zip(MNIST_FILES, (xtr, ytr, xte, yte), (image_magic, 2049, image_magic, 2049)):
        _write_idx(folder / name, data.to(torch.uint8), magic)
    return xtr, ytr, xte, yte


@pytest.mark.parametrize("layout", ["folder", "parent"])
def test_idx_files_are_parsed_big_endian_and_normalized_with_mnist_constants(tmp_path, layout):
    xtr, ytr, xte, yte = _fake_mnist(tmp_path / "mnist")
    root = tmp_path / "mnist" if layout == "folder" else tmp_path
    b = load_dataset("mnist", str(root), val_fraction=0)
    assert torch.allclose(b.train.x, ((xtr.float() / 255 - 0.1307) / 0.3081).unsqueeze(1))
    assert torch.allclose(b.test.x, ((xte.float() / 255 - 0.1307) / 0.3081).unsqueeze(1))
    assert torch.equal(b.train.y, ytr) and torch.equal(b.test.y, yte)


def test_idx_with_wrong_magic_is_refused(tmp_path):
    _fake_mnist(tmp_path, image_magic=2049)
    with pytest.raises(DataNotFoundError, match="2051"):
        load_dataset("mnist", str(tmp_path))


def _fake_cifar(folder, per_batch=4):
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    batches = {}
    for name in CIFAR10_FILES:
        data = torch.randint(0, 256, (per_batch, 3072), generator=g, dtype=torch.uint8).numpy()
        labels = (torch.arange(per_batch) % 10).tolist()
        batches[name] = (data, labels)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"x"}))
    return batches


def test_cifar_pickles_are_read_as_rgb_planes_and_normalized_per_channel(tmp_path):
    batches = _fake_cifar(tmp_path / "cifar-10-batches-py")
    b = load_dataset("cifar10", str(tmp_path), val_fraction=0)
    assert len(b.train) == 20 and len(b.test) == 4
    data, labels = batches["data_batch_2"]
    raw = torch.tensor(data[1]).float() / 255
    for c in range(3):
        plane = raw[c * 1024:(c + 1) * 1024].reshape(32, 32)
        assert torch.allclose(b.train.x[5, c], (plane - CIFAR10_MEAN[c]) / CIFAR10_STD[c], atol=1e-6)
    assert b.train.y[4:8].tolist() == labels


# ----------------------------------------------------------------------------- augmentation

def test_random_crop_flip_output_is_a_crop_of_the_padded_image_possibly_flipped():
    torch.manual_seed(0)
    fill = (-1.0, -2.0, -3.0)
    t = RandomCropFlip(32, 4, fill)
    x = torch.randn(3, 32, 32)
    padded = torch.stack([F.pad(x[c], (4, 4, 4, 4), value=fill[c]) for c in range(3)])
    seen = set()
    for _ in range(60):
        out = t(x)
        assert out.shape == x.shape
        found = [(i, j, fl) for i in range(9) for j in range(9) for fl in (False, True)
                 if torch.equal(out, padded[:, i:i + 32, j:j + 32].flip(-1) if fl else padded[:, i:i + 32, j:j + 32])]
        assert found, "output is not a crop of the padded image"
        seen.add(found[0])
    assert {fl for _, _, fl in seen} == {False, True}
    assert len({(i, j) for i, j, _ in seen}) > 20


def test_cifar_augment_applies_to_train_only_and_leaves_stored_tensors_alone(tmp_path):
    _fake_cifar(tmp_path / "cifar-10-batches-py")
    b = load_dataset("cifar10", str(tmp_path), augment=True, val_fraction=0.25)
    assert isinstance(b.train.transform, RandomCropFlip)
    assert b.val.transform is None and b.test.transform is None
    before = b.train.x.clone()
    torch.manual_seed(0)
    outs = [b.train[0][0] for _ in range(10)]
    assert torch.equal(before, b.train.x)
    assert any(not torch.equal(o, outs[0]) for o in outs)
    # padding is black (pixel 0) after normalization
    fill = torch.tensor([(0 - m) / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)])
    assert torch.allclose(b.train.transform.fill.flatten(), fill)
    flat = load_dataset("cifar10", str(tmp_path), augment=True, flatten=True)
    assert flat.train[0][0].shape == (3072,)


def test_augment_without_an_augmentation_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        b = load_dataset("digits", augment=True)
    assert b.train.transform is None and "augment" in caplog.text


@pytest.mark.parametrize("name", ["cifar10"])
def test_real_cifar_is_normalized_per_channel(name):
    root = _need(name)
    x = load_dataset(name, root).train.x
    assert (x.mean((0, 2, 3)).abs() < 0.05).all() and ((x.std((0, 2, 3)) - 1).abs() < 0.05).all()


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_shaped_and_seeded_by_data_seed():
    a = load_dataset("synthetic", input_shape=[1, 4, 4], num_classes=3, train_size=90, test_size=30, val_fraction=0)
    b = load_dataset("synthetic", input_shape=[1, 4, 4], num_classes=3, train_size=90, test_size=30, val_fraction=0)
    c = load_dataset("synthetic", input_shape=[1, 4, 4], num_classes=3, train_size=90, test_size=30, val_fraction=0,
                     data_seed=1)
    assert a.input_shape == (1, 4, 4) and a.num_classes == 3 and len(a.train) == 90 and len(a.test) == 30
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    assert torch.bincount(torch.cat([a.train.y, a.test.y])).tolist() == [40, 40, 40]


def test_synthetic_is_learnable_test_accuracy_rises_from_chance():
    torch.manual_seed(0)
    b = load_dataset("synthetic", num_classes=4)
    model = torch.nn.Linear(16, 4)
    acc = lambda: (model(b.test.x).argmax(1) == b.test.y).float().mean().item()  # noqa: E731
    before = acc()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(b.train.x), b.train.y).backward()
        opt.step()
    assert before < 0.5 and acc() > 0.9


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name,files", [("mnist", MNIST_FILES), ("fashion_mnist", MNIST_FILES),
                                        ("cifar10", CIFAR10_FILES)])
def test_missing_folder_raises_data_not_found_naming_folder_and_files(tmp_path, name, files):
    with pytest.raises(DataNotFoundError) as e:
        load_dataset(name, str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert str((tmp_path / "nowhere").resolve()) in msg
    assert all(f in msg for f in files)
    if name == "cifar10":
        assert "python ../shared/data/cifar10-jpeg/build_cifar10.py OUT_DIR" in msg


def test_folder_missing_one_file_is_not_accepted(tmp_path):
    _fake_mnist(tmp_path)
    (tmp_path / MNIST_FILES[3]).unlink()
    with pytest.raises(DataNotFoundError, match=MNIST_FILES[3]):
        load_dataset("mnist", str(tmp_path))


def test_unknown_dataset_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        load_dataset("imagenet")
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)
    assert all(n in str(e.value) for n in KNOWN) and e.value.valid == sorted(KNOWN)


def test_every_bad_option_is_reported_together():
    with pytest.raises(InvalidOptionError) as e:
        load_dataset("synthetic", val_fraction=1.0, limit=0, seed="a", colour=True, num_classes=1)
    problems = e.value.problems
    assert len(problems) == 4   # loader options are checked after the common ones
    assert any("val_fraction" in p for p in problems) and any("limit" in p for p in problems)
    assert any("seed" in p for p in problems)
    assert any("'colour'" in p and "num_classes" in p for p in problems)
    with pytest.raises(InvalidOptionError, match="num_classes=1"):
        load_dataset("synthetic", num_classes=1, input_shape=[0])
    with pytest.raises(InvalidOptionError, match="valid options: \\(none\\)"):
        load_dataset("digits", num_classes=3)
