"""Offline data sets of the experiments, removal sets and the four evaluation splits.

Nothing is downloaded: digits ships with scikit-learn, Yeast with the ``river`` package (or a
``yeast.csv[.gz]`` in ``data_dir``), Fashion-MNIST comes from idx files (the Debian package
``dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import gzip
import importlib.util
import io as _io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ssse_ext.validation import check_positive_int

__all__ = [
    "DATASETS",
    "DataUnavailableError",
    "Dataset",
    "FASHION_MNIST_DIR",
    "attribute_removal",
    "class_removal",
    "four_splits",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_recorded",
    "load_yeast",
    "read_idx",
    "two_blobs_2d",
    "write_idx",
    "yeast_file",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("digits", "fashion-mnist", "yeast")
_FASHION_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
                  "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


class DataUnavailableError(FileNotFoundError):
    """A data set's files are not on this machine (the message says how to get them)."""


@dataclass
class Dataset:
    """A train/test split.

    ``task`` is ``"multiclass"`` (``y`` int64 class indices), ``"multilabel"`` (``y`` a 0/1
    float matrix, one column per attribute) or ``"binary"`` (``y`` int64 in {0, 1}).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str
    num_classes: int
    image_shape: tuple[int, ...] | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        return int(self.x_train[0].numel())

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train, self.y_train

    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_test, self.y_test


def _standardise(x_train: np.ndarray, x_test: np.ndarray):
    mean = x_train.mean(0)
    std = x_train.std(0)
    std[std < 1e-8] = 1.0  # constant features (digits' border pixels) stay at 0
    return (x_train - mean) / std, (x_test - mean) / std


def _subset(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def _check_train_limit(train_limit, n: int, name: str) -> int | None:
    """``train_limit`` as given, refused when it asks for more samples than ``name`` has in
    its training split (a model trained on fewer samples than asked is not what was asked)."""
    if train_limit is None:
        return None
    train_limit = check_positive_int(train_limit, "train_limit")
    if train_limit > n:
        raise ValueError(f"train_limit (--train-limit) must be at most the {n} training "
                         f"samples of {name}, got {train_limit}")
    return train_limit


# ---- digits -------------------------------------------------------------------------------

def load_digits(*, seed: int = 0, test_fraction: float = 0.3, train_limit: int | None = None,
                dtype: torch.dtype = torch.float64) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), standardised, split by ``seed``."""
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    x, y = _sk_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction,
                                              random_state=seed, stratify=y)
    train_limit = _check_train_limit(train_limit, len(y_tr), "digits")
    keep = _subset(len(y_tr), train_limit, np.random.default_rng(seed))
    x_tr, y_tr = x_tr[keep], y_tr[keep]
    x_tr, x_te = _standardise(x_tr, x_te)
    return Dataset("digits", torch.tensor(x_tr, dtype=dtype), torch.tensor(y_tr),
                   torch.tensor(x_te, dtype=dtype), torch.tensor(y_te), "multiclass", 10,
                   image_shape=(1, 8, 8), info={"seed": seed, "test_fraction": test_fraction})


# ---- idx files (MNIST format) -------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an idx file (optionally gzipped), the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) != 4 + 4 * ndim + count * dtype.itemsize:
        raise ValueError(f"{path}: size does not match its idx header {shape}")
    return np.frombuffer(raw, dtype, count=count, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool = False) -> Path:
    """Writes a uint8 array as an idx file (used by tests to make tiny Fashion-MNIST files)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(data) if compress else data)
    return Path(path)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_fashion_mnist(data_dir: str | Path | None = None, *, seed: int = 0,
                       train_limit: int | None = None, test_limit: int | None = None,
                       dtype: torch.dtype = torch.float32) -> Dataset:
    """Fashion-MNIST from idx files, pixels scaled to [0, 1] and centred by the training mean.

    ``train_limit``/``test_limit`` keep a random subset (chosen by ``seed``) to fit CPU budgets.

    Raises:
        DataUnavailableError: the four idx files are not in ``data_dir``.
    """
    directory = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    files = {k: _find(directory, stem) for k, stem in _FASHION_FILES.items()}
    missing = [_FASHION_FILES[k] for k, v in files.items() if v is None]
    if missing:
        raise DataUnavailableError(
            f"Fashion-MNIST not found in {directory} (missing {', '.join(missing)}); install it "
            f"with `apt-get install dataset-fashion-mnist` or pass --data-dir DIR holding the "
            f"idx files")
    arrays = {k: read_idx(p) for k, p in files.items()}
    train_limit = _check_train_limit(train_limit, len(arrays["train_y"]), "fashion-mnist")
    rng = np.random.default_rng(seed)
    tr = _subset(len(arrays["train_y"]), train_limit, rng)
    te = _subset(len(arrays["test_y"]), test_limit, rng)
    x_tr = arrays["train_x"][tr].reshape(len(tr), -1).astype(np.float64) / 255.0
    x_te = arrays["test_x"][te].reshape(len(te), -1).astype(np.float64) / 255.0
    mean = x_tr.mean()
    side = int(round(np.sqrt(x_tr.shape[1])))
    return Dataset("fashion-mnist", torch.tensor(x_tr - mean, dtype=dtype),
                   torch.tensor(arrays["train_y"][tr].astype(np.int64)),
                   torch.tensor(x_te - mean, dtype=dtype),
                   torch.tensor(arrays["test_y"][te].astype(np.int64)), "multiclass", 10,
                   image_shape=(1, side, side),
                   info={"seed": seed, "data_dir": str(directory), "train_limit": train_limit,
                         "test_limit": test_limit})


# ---- Yeast --------------------------------------------------------------------------------

def yeast_file(data_dir: str | Path | None = None) -> Path:
    """The Yeast csv(.gz): in ``data_dir``, or shipped with the ``river`` package."""
    candidates = []
    if data_dir is not None:
        candidates += [Path(data_dir) / "yeast.csv.gz", Path(data_dir) / "yeast.csv"]
    else:
        spec = importlib.util.find_spec("river")  # locate the file without importing river
        if spec is not None and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                candidates.append(Path(root) / "datasets" / "yeast.csv.gz")
    for path in candidates:
        if path.is_file():
            return path
    raise DataUnavailableError(
        "the Yeast data set was not found: it ships with the `river` package "
        "(`pip install river`), or pass --data-dir DIR holding yeast.csv or yeast.csv.gz "
        "(columns Att1..Att103, Class1..Class14)")


def load_yeast(data_dir: str | Path | None = None, *, seed: int = 0, n_train: int = 1500,
               train_limit: int | None = None, dtype: torch.dtype = torch.float64) -> Dataset:
    """Yeast multi-label data (2417 genes x 103 features, 14 functional classes; MULAN's
    version), standardised, with a constant 104th feature, split at random (by ``seed``) into
    ``n_train`` training and the remaining test samples (MULAN's own split is 1500/917);
    ``train_limit`` keeps a random subset of the training samples."""
    path = yeast_file(data_dir)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8")
    header = text.split("\n", 1)[0].strip().split(",")
    table = np.loadtxt(_io.StringIO(text), delimiter=",", skiprows=1, dtype=np.float64)
    feats = [i for i, h in enumerate(header) if h.startswith("Att")]
    labels = [i for i, h in enumerate(header) if h.startswith("Class")]
    if not feats or not labels:
        raise ValueError(f"{path}: expected columns Att* and Class*, got {header[:3]}...")
    x, y = table[:, feats], table[:, labels]
    perm = np.random.default_rng(seed).permutation(len(x))
    tr, te = perm[:n_train], perm[n_train:]
    train_limit = _check_train_limit(train_limit, len(tr), "yeast")
    tr = tr[_subset(len(tr), train_limit, np.random.default_rng(seed))]
    x_tr, x_te = _standardise(x[tr], x[te])
    # A constant feature: the model has no bias parameter, so each attribute's row carries its
    # own intercept (and stays one Fisher block).
    x_tr = np.hstack([x_tr, np.ones((len(x_tr), 1))])
    x_te = np.hstack([x_te, np.ones((len(x_te), 1))])
    return Dataset("yeast", torch.tensor(x_tr, dtype=dtype), torch.tensor(y[tr], dtype=dtype),
                   torch.tensor(x_te, dtype=dtype), torch.tensor(y[te], dtype=dtype),
                   "multilabel", len(labels), info={"seed": seed, "file": str(path)})


# ---- 2-D illustration ---------------------------------------------------------------------

def two_blobs_2d(n: int = 60, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> Dataset:
    """Two overlapping Gaussian blobs in the plane (binary labels), for paper Fig. 1."""
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    x0 = torch.randn(half, 2, generator=g, dtype=dtype) * 0.9 + torch.tensor([-1.0, -0.6],
                                                                             dtype=dtype)
    x1 = torch.randn(n - half, 2, generator=g, dtype=dtype) * 0.9 + torch.tensor([1.0, 0.6],
                                                                                 dtype=dtype)
    x = torch.cat([x0, x1])
    y = torch.cat([torch.zeros(half, dtype=torch.int64), torch.ones(n - half, dtype=torch.int64)])
    return Dataset("blobs-2d", x, y, x[:0], y[:0], "binary", 2, info={"seed": seed})


# ---- registry -----------------------------------------------------------------------------

def load_dataset(name: str, *, data_dir: str | Path | None = None, seed: int = 0,
                 train_limit: int | None = None, test_limit: int | None = None,
                 dtype: torch.dtype | None = None) -> Dataset:
    """One of :data:`DATASETS` by name (``dtype`` defaults to float64 for the small convex
    data sets and float32 for Fashion-MNIST)."""
    if name == "digits":
        return load_digits(seed=seed, train_limit=train_limit, dtype=dtype or torch.float64)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, seed=seed, train_limit=train_limit,
                                  test_limit=test_limit, dtype=dtype or torch.float32)
    if name == "yeast":
        return load_yeast(data_dir, seed=seed, train_limit=train_limit,
                          dtype=dtype or torch.float64)
    raise ValueError(f"unknown data set {name!r} (expected one of {', '.join(DATASETS)})")


def load_recorded(info: dict, *, dtype: torch.dtype | None = None) -> Dataset:
    """The data set a model file records (its header's ``data``: ``name``, ``seed``,
    ``train_limit``, ``test_limit``, ``data_dir``), split and subsampled as it was."""
    if "name" not in info:
        raise ValueError("the model file records no data set: name one (data={'name': ...}, "
                         "--data)")
    return load_dataset(info["name"], data_dir=info.get("data_dir"), seed=int(info.get("seed", 0)),
                        train_limit=info.get("train_limit"), test_limit=info.get("test_limit"),
                        dtype=dtype)


# ---- removal sets and splits --------------------------------------------------------------

def class_removal(y: torch.Tensor, classes, fraction: float, *, seed: int = 0) -> torch.Tensor:
    """Sorted training indices of a random ``fraction`` of the samples of each class in
    ``classes``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in ([classes] if isinstance(classes, int) else list(classes)):
        idx = torch.nonzero(y == c).flatten()
        if idx.numel() == 0:
            raise ValueError(f"class {c} has no training samples")
        k = max(1, int(round(fraction * idx.numel())))
        out.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
    return torch.sort(torch.cat(out)).values


def attribute_removal(y: torch.Tensor, attribute: int, fraction: float, *,
                      seed: int = 0) -> torch.Tensor:
    """Sorted indices of a random ``fraction`` of the samples carrying ``attribute`` (a
    multi-label 0/1 matrix ``y``)."""
    return class_removal((y[:, attribute] > 0.5).long(), [1], fraction, seed=seed)


def four_splits(ds: Dataset, removed: torch.Tensor, *, classes=None,
                attribute: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The paper's four evaluation splits: ``D-S`` (retained), ``S`` (removed), ``T-Ta`` and
    ``Ta`` (test samples without / with the removed classes or attribute)."""
    keep = torch.ones(ds.n_train, dtype=torch.bool)
    keep[removed] = False
    if attribute is not None:
        affected = ds.y_test[:, attribute] > 0.5
    elif classes is not None:
        cls = torch.tensor([classes] if isinstance(classes, int) else list(classes))
        affected = torch.isin(ds.y_test, cls)
    else:
        affected = torch.zeros(ds.x_test.shape[0], dtype=torch.bool)
    return {"D-S": (ds.x_train[keep], ds.y_train[keep]),
            "S": (ds.x_train[removed], ds.y_train[removed]),
            "T-Ta": (ds.x_test[~affected], ds.y_test[~affected]),
            "Ta": (ds.x_test[affected], ds.y_test[affected])}
