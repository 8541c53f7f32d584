"""Datasets for the benchmark runner, held in memory as tensors.

    from bio_ext.benchmark.data import load_dataset
    bundle = load_dataset("digits")                      # no files needed
    bundle = load_dataset("mnist", "../shared/data")     # or the folder holding the idx files
    x, y = bundle.train[0]                               # float32 (1, 28, 28), int64 scalar

Registered names (:func:`available_datasets`):

``digits``
    scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), input (1, 8, 8). The train/test
    split is FIXED: 80/20 stratified with ``random_state=0`` (1,437 / 360), independent of ``seed``
    so every run is scored on the same test set. Pixels are scaled to [0, 1] (divided by 16), then
    standardized with the mean and std of that fixed train split.
``mnist`` / ``fashion_mnist``
    The four standard idx ``.gz`` files. ``root`` may be the folder holding them or its parent
    (the ``data`` folder holding ``mnist/`` or ``fashion-mnist/``); the default is
    ``../shared/data/<folder>`` relative to the current directory (then relative to the repository).
    Normalized with the usual constants: MNIST mean 0.1307 std 0.3081, Fashion-MNIST 0.2860 / 0.3530.
    A damaged file (truncated ``.gz``, not gzip, fewer bytes than its header announces) is a
    one-line :class:`~bio_ext.benchmark.errors.DataFileError` naming it, as is a damaged CIFAR-10 batch.
``cifar10``
    The standard ``cifar-10-batches-py`` pickles (``data_batch_1`` .. ``data_batch_5``,
    ``test_batch``). ``root`` may be that folder or its parent. Normalized per channel with
    biotorch's constants (mean 0.4914 0.4821 0.4465, std 0.2470 0.2435 0.2616). ``augment=True``
    gives the train split (only) a random 32x32 crop of the image padded by 4 and a random
    horizontal flip, applied per example on tensors (padding is black, as torchvision pads the
    image before normalizing).
``synthetic``
    Gaussian class clusters generated from a fixed ``data_seed``: learnable, deterministic, no
    files. Options: ``input_shape`` (default (16,)), ``num_classes`` (4), ``train_size`` (512),
    ``test_size`` (256), ``noise`` (1.0; per-coordinate std around unit-norm-scaled class centres
    of radius ``separation``), ``separation`` (3.0), ``data_seed`` (0).

Splits, as biotorch does them (``biotorch.datasets.cifar.CIFAR10Benchmark``: 45k/5k of CIFAR-10's
50k): the validation holdout is ``random.Random(seed).sample(range(n_train), k)`` with
``k = round(val_fraction * n_train)``; the remaining train examples keep their original order
and the validation examples are in sample order. With ``seed=0`` and ``val_fraction=0.1`` this is
exactly biotorch's CIFAR-10 benchmark split (biotorch seeds ``random`` with 0). For its other
datasets biotorch uses the test set as validation; here ``val_fraction=0`` gives ``val=None``
instead. ``limit`` keeps ``limit`` train examples (after the holdout), chosen by a permutation
seeded with ``seed`` and kept in their original order; val is not limited; ``test_limit`` keeps the first
``test_limit`` test examples (the same ones for every run; for quick CPU proxies).
"""

from __future__ import annotations

import gzip
import inspect
import logging
import os
import pickle
import random
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ..errors import DataNotFoundError, InvalidOptionError, UnknownNameError
from .errors import DataFileError

log = logging.getLogger(__name__)

__all__ = ["DataBundle", "TensorDataset", "DATASETS", "register_dataset", "available_datasets", "load_dataset",
           "default_data_dirs", "MNIST_FILES", "CIFAR10_FILES"]

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_MEAN = (0.4914, 0.4821, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class DataBundle:
    """A dataset's splits plus what a model builder needs to know about it."""

    name: str
    train: Dataset
    val: Optional[Dataset]
    test: Dataset
    num_classes: int
    input_shape: Tuple[int, ...]


class TensorDataset(Dataset):
    """Examples held as one float32 tensor ``x`` (N, ...) and int64 labels ``y`` (N,).

    ``transform``, if given, is applied to each example on access (training augmentation); the
    stored tensors are never changed. ``x`` and ``y`` are public so a runner can batch without a
    DataLoader when there is no transform.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
        self.x = x.float()
        self.y = y.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.y[i]

    def __repr__(self) -> str:
        return f"TensorDataset(n={len(self)}, x={tuple(self.x.shape[1:])}, transform={self.transform!r})"


class RandomCropFlip:
    """Random ``size`` crop of the example padded by ``padding`` on each side (pad value ``fill``
    per channel), then a horizontal flip with probability 1/2. Uses torch's global generator."""

    def __init__(self, size: int = 32, padding: int = 4, fill: Sequence[float] = (0.0,)):
        self.size, self.padding = size, padding
        self.fill = torch.tensor(fill, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape
        p = self.padding
        canvas = self.fill.to(x.dtype).expand(c, h + 2 * p, w + 2 * p).clone()
        canvas[:, p:p + h, p:p + w] = x
        i = int(torch.randint(0, h + 2 * p - self.size + 1, ()))
        j = int(torch.randint(0, w + 2 * p - self.size + 1, ()))
        out = canvas[:, i:i + self.size, j:j + self.size]
        if torch.rand(()) < 0.5:
            out = out.flip(-1)
        return out.contiguous()

    def __repr__(self) -> str:
        return f"RandomCropFlip(size={self.size}, padding={self.padding})"


# --------------------------------------------------------------------------------------- registry

DATASETS: Dict[str, Callable] = {}


def register_dataset(name: str):
    """Decorator: register ``fn(root, **options) -> (x_train, y_train, x_test, y_test, num_classes, info)``.

    ``x_*`` are float32 tensors already normalized, ``y_*`` int64; ``info`` is a dict that may hold
    ``"train_transform"`` (a per-example callable used when ``augment=True``).
    """

    def deco(fn):
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered already")
        DATASETS[name] = fn
        return fn

    return deco


def available_datasets() -> List[str]:
    return sorted(DATASETS)


def _holdout(n: int, val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """biotorch's validation holdout: ``random.Random(seed).sample(range(n), round(f * n))``."""
    k = int(round(val_fraction * n))
    val = random.Random(seed).sample(range(n), k) if k else []
    taken = set(val)
    return [i for i in range(n) if i not in taken], val


def load_dataset(name: str, root: Optional[str] = None, *, val_fraction: float = 0.1, seed: int = 0,
                 limit: Optional[int] = None, flatten: bool = False, augment: bool = False,
                 test_limit: Optional[int] = None, **options) -> DataBundle:
    """Load a registered dataset into memory and split it (see the module docstring).

    ``options`` go to the dataset's loader (e.g. ``synthetic``'s ``num_classes``); unknown ones
    raise :class:`~bio_ext.errors.InvalidOptionError` naming the valid ones.
    """
    if name not in DATASETS:
        raise UnknownNameError("dataset", name, DATASETS, hint="or register one with @register_dataset")
    loader = DATASETS[name]
    problems = []
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        problems.append(f"val_fraction={val_fraction!r}: must be a number in [0, 1), e.g. 0.1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        problems.append(f"seed={seed!r}: must be an int")
    for what, value in (("limit", limit), ("test_limit", test_limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"{what}={value!r}: must be a positive int or None")
    params = inspect.signature(loader).parameters
    valid = [p for p in params if p != "root"]
    for k in options:
        if k not in params or k == "root":
            problems.append(f"unknown option {k!r} for dataset {name!r}; valid options: "
                            f"{', '.join(valid) if valid else '(none)'}")
    if problems:
        raise InvalidOptionError(problems, what=f"options for dataset {name!r}")

    xtr, ytr, xte, yte, num_classes, info = loader(root, **options)
    tr_idx, val_idx = _holdout(len(ytr), float(val_fraction), seed)
    if limit is not None and limit < len(tr_idx):
        g = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(tr_idx), generator=g)[:limit].tolist())
        tr_idx = [tr_idx[i] for i in keep]
    input_shape = tuple(xtr.shape[1:])
    transform = info.get("train_transform") if augment else None
    if augment and transform is None:
        log.warning("dataset %r has no augmentation; augment=True ignored", name)
    if flatten:
        xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
        if transform is not None:
            transform = _Flattened(transform, input_shape)
        input_shape = (int(xtr.shape[1]),)
    tr_idx_t = torch.tensor(tr_idx, dtype=torch.long)
    train = TensorDataset(xtr[tr_idx_t], ytr[tr_idx_t], transform)
    val = TensorDataset(xtr[torch.tensor(val_idx, dtype=torch.long)], ytr[torch.tensor(val_idx, dtype=torch.long)]) \
        if val_idx else None
    test = TensorDataset(xte[:test_limit], yte[:test_limit])
    log.info("dataset %s: train %d, val %d, test %d, input %s, %d classes", name, len(train),
             0 if val is None else len(val), len(test), input_shape, num_classes)
    return DataBundle(name=name, train=train, val=val, test=test, num_classes=int(num_classes),
                      input_shape=input_shape)


class _Flattened:
    def __init__(self, transform, shape):
        self.transform, self.shape = transform, shape

    def __call__(self, x):
        return self.transform(x.reshape(self.shape)).reshape(-1)

    def __repr__(self) -> str:
        return f"Flattened({self.transform!r})"


# --------------------------------------------------------------------------------------- file lookup

def default_data_dirs() -> List[Path]:
    """Where the shared data folder is looked for when no root is given: ``../shared/data`` from
    the current directory, then from the repository root (the folder above ``bio_ext/``)."""
    here = Path(os.getcwd()) / ".." / "shared" / "data"
    repo = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    out = [here]
    if repo.resolve() != here.resolve():
        out.append(repo)
    return out


def _find(root: Optional[str], folder_names: Sequence[str], files: Sequence[str], how: str, what: str) -> Path:
    """The first candidate folder holding every file in ``files``; else DataNotFoundError."""
    if root is not None:
        base = [Path(root).expanduser()]
    else:
        base = default_data_dirs()
    candidates = []
    for b in base:
        candidates += ([b] if root is not None else []) + [b / f for f in folder_names]
    for c in candidates:
        if all((c / f).is_file() for f in files):
            return c
    looked = ", ".join(str(c.resolve()) + ("" if c.is_dir() else " (absent)") for c in candidates)
    raise DataNotFoundError(
        f"{what} not found: looked in {looked}. Expected a folder holding exactly these files: "
        f"{', '.join(files)}. {how} In a YAML config, set data.dataset_path to that folder.")


#: what to do with a damaged data file, said in every DataFileError
_REPLACE = "replace it with the original file (download it again or copy it from ../shared/data)"


def _read_idx(path: Path, expect_magic: int) -> torch.Tensor:
    """One gzipped IDX file as a uint8 tensor of the shape its header gives. A truncated or
    non-gzip file, or one holding fewer bytes than its header announces, is a
    :class:`~bio_ext.benchmark.errors.DataFileError` naming it."""
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataFileError(path, f"truncated: {len(head)} bytes where the IDX header needs 4; {_REPLACE}")
            magic = struct.unpack(">I", head)[0]
            if magic != expect_magic:
                raise DataNotFoundError(f"{path} is not an IDX file of the expected kind: magic number {magic}, "
                                        f"expected {expect_magic} (2051 for images, 2049 for labels); "
                                        "replace it with the original file")
            ndim = magic & 0xFF
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DataFileError(path, f"truncated inside its IDX header; {_REPLACE}")
            shape = struct.unpack(">" + "I" * ndim, dims)
            data = f.read()
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        what = "truncated (the gzip stream ends early)" if isinstance(e, EOFError) else \
            f"not a readable gzip file ({e})"
        raise DataFileError(path, f"{what}; {_REPLACE}") from None
    expected = 1
    for n in shape:
        expected *= n
    if len(data) != expected:
        raise DataFileError(path, f"holds {len(data)} bytes of data where its header ({' x '.join(map(str, shape))}) "
                            f"announces {expected}; {_REPLACE}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)


@lru_cache(maxsize=4)
def _idx_set(folder: str):
    p = Path(folder)
    return (_read_idx(p / MNIST_FILES[0], 2051), _read_idx(p / MNIST_FILES[1], 2049),
            _read_idx(p / MNIST_FILES[2], 2051), _read_idx(p / MNIST_FILES[3], 2049))


def _mnist_like(root, folders, what, mean, std, how):
    folder = _find(root, folders, MNIST_FILES, how, what)
    xtr, ytr, xte, yte = _idx_set(str(folder.resolve()))
    norm = lambda x: ((x.float() / 255.0 - mean) / std).unsqueeze(1)  # noqa: E731
    return norm(xtr), ytr.long(), norm(xte), yte.long(), 10, {}


@register_dataset("mnist")
def _mnist(root=None):
    return _mnist_like(root, ["mnist", "MNIST"], "MNIST", 0.1307, 0.3081,
                       "Get them from the MNIST site (yann.lecun.com/exdb/mnist or a mirror) or copy "
                       "../shared/data/mnist, and pass that folder (or its parent) as root.")


@register_dataset("fashion_mnist")
def _fashion_mnist(root=None):
    return _mnist_like(root, ["fashion-mnist", "fashion_mnist", "FashionMNIST"], "Fashion-MNIST", 0.2860, 0.3530,
                       "Get them from github.com/zalandoresearch/fashion-mnist (data/fashion), or "
                       "`apt-get install dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist), "
                       "or copy ../shared/data/fashion-mnist, and pass that folder (or its parent) as root.")


@lru_cache(maxsize=2)
def _cifar_raw(folder: str):
    p = Path(folder)

    def batch(name):
        try:
            with open(p / name, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
            x = torch.as_tensor(d["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
            return x, torch.as_tensor(d["labels"], dtype=torch.long)
        except (EOFError, pickle.UnpicklingError, AttributeError, KeyError, RuntimeError, TypeError, ValueError) as e:
            raise DataFileError(p / name, f"not a complete CIFAR-10 batch ({type(e).__name__}: {e}); "
                                f"{_REPLACE}") from None

    parts = [batch(n) for n in CIFAR10_FILES[:5]]
    xte, yte = batch(CIFAR10_FILES[5])
    return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts]), xte, yte


@register_dataset("cifar10")
def _cifar10(root=None):
    folder = _find(root, [CIFAR10_FOLDER], CIFAR10_FILES,
                   "Build them from the JPEG copy with `python ../shared/data/cifar10-jpeg/build_cifar10.py OUT_DIR` "
                   f"(writes OUT_DIR/{CIFAR10_FOLDER}, about a minute) and pass OUT_DIR as root; or download "
                   "cifar-10-python.tar.gz from www.cs.toronto.edu/~kriz/cifar.html and pass the folder it "
                   "unpacks into.", "CIFAR-10")
    xtr, ytr, xte, yte = _cifar_raw(str(folder.resolve()))
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    norm = lambda x: (x.float() / 255.0 - mean) / std  # noqa: E731
    fill = tuple(((0.0 - m) / s) for m, s in zip(CIFAR10_MEAN, CIFAR10_STD))
    return norm(xtr), ytr, norm(xte), yte, 10, {"train_transform": RandomCropFlip(32, 4, fill)}


@register_dataset("digits")
def _digits(root=None):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(list(range(len(y))), test_size=0.2, stratify=d.target, random_state=0)
    xtr, xte = x[idx_tr], x[idx_te]
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, y[idx_tr], (xte - mean) / std, y[idx_te], 10, {}


@register_dataset("synthetic")
def _synthetic(root=None, *, input_shape: Sequence[int] = (16,), num_classes: int = 4, train_size: int = 512,
               test_size: int = 256, noise: float = 1.0, separation: float = 3.0, data_seed: int = 0):
    problems = []
    shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else None
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        problems.append(f"input_shape={input_shape!r}: must be a non-empty list of positive ints, "
                        "e.g. [16] or [1, 8, 8]")
    for k, v, lo in (("num_classes", num_classes, 2), ("train_size", train_size, 1), ("test_size", test_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            problems.append(f"{k}={v!r}: must be an int >= {lo}")
    for k, v in (("noise", noise), ("separation", separation)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            problems.append(f"{k}={v!r}: must be a number >= 0")
    if isinstance(data_seed, bool) or not isinstance(data_seed, int):
        problems.append(f"data_seed={data_seed!r}: must be an int")
    if problems:
        raise InvalidOptionError(problems, what="options for dataset 'synthetic'")
    g = torch.Generator().manual_seed(data_seed)
    dim = 1
    for s in shape:
        dim *= s
    centres = torch.randn(num_classes, dim, generator=g)
    centres = centres / centres.norm(dim=1, keepdim=True) * separation
    n = train_size + test_size
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    x = centres[y] + noise * torch.randn(n, dim, generator=g)
    x = x.reshape(n, *shape)
    return x[:train_size], y[:train_size], x[train_size:], y[train_size:], num_classes, {}
