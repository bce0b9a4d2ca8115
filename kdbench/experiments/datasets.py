"""Offline datasets with train / validation / test splits fixed by a seed.

Nothing here touches the network.  Every dataset comes back as a :class:`Dataset`
of float32 inputs and int64 labels, already normalised, so that training can index
random batches out of one tensor (no DataLoader):

========================  ==============  =========  ==============================================
name                      input shape     classes    source
========================  ==============  =========  ==============================================
``mnist1d``               (40,)           10         ``mnist1d.data.make_dataset`` (published args,
                                                     4000 train / 1000 test; ``dataset_size`` =
                                                     total samples, 80% train)
``digits``                (1, 8, 8)       10         scikit-learn's bundled 8x8 digits (1797),
                                                     stratified 20% test
``gaussian``              (10,)           10         synthetic mixture with a closed-form Bayes
                                                     posterior (see :func:`gaussian_posterior`)
``mnist``                 (1, 28, 28)     10         ``<data_dir>/MNIST/raw/*-idx?-ubyte[.gz]``
``fashion_mnist``         (1, 28, 28)     10         ``<data_dir>/FashionMNIST/raw/...``
``cifar10``               (3, 32, 32)     10         ``<data_dir>/cifar-10-batches-py/``
``cifar100``              (3, 32, 32)     100        ``<data_dir>/cifar-100-python/``
========================  ==============  =========  ==============================================

The on-disk layouts are torchvision's, read here without torchvision.  The
validation split is carved out of the training split, stratified by class, with
``numpy.random.default_rng(data_seed)``; image inputs are standardised per channel
with statistics of the (remaining) training split only.

Gaussian mixture: ``mu_k ~ N(0, s^2 I_d)`` (drawn once from ``data_seed``),
``y ~ Uniform{0..K-1}``, ``x | y ~ N(mu_y, I_d)``.  With equal priors and a shared
identity covariance the Bayes posterior is exactly
``P(y = k | x) = softmax_k(x . mu_k - |mu_k|^2 / 2)``, so the *true* calibration error
of a classifier, ``E_x |conf(x) - P(y = pred(x) | x)|``, can be computed without bins.
With d = 10, K = 10, s = 1 the Bayes accuracy is about 83%.
"""

from __future__ import annotations

import functools
import gzip
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

GAUSSIAN_DIM = 10
GAUSSIAN_CLASSES = 10
GAUSSIAN_SPREAD = 1.0
GAUSSIAN_DEFAULT_SIZE = 10_000
TEST_FRACTION = 0.2  # digits and gaussian have no published test split


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset without loading it (used to validate configs)."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    from_disk: bool  # read from ``data_dir``
    sizable: bool  # accepts ``dataset_size`` (generated datasets)
    augmentable: bool  # image data for which random crops make sense
    posterior: bool = False  # the Bayes posterior P(y | x) is known in closed form (oracle_kd, bayes/ fields)
    kind: str = "classification"  # or "lm": token sequences (N, L), next-token prediction over V = num_classes


@dataclass(frozen=True)
class Dataset:
    """Splits as tensors: x_* float32 ``(N, *input_shape)``, y_* int64 ``(N,)``.

    ``posterior_val`` / ``posterior_test`` hold the Bayes posterior ``(N, C)`` (float64)
    where it is known (``gaussian``), else None.  ``bayes_logits`` (None where the
    posterior is unknown) maps any inputs ``(N, *input_shape)``, training split included,
    on any device, to float64 logits ``(N, C)`` whose softmax is that posterior; their
    ``log_softmax`` is ``log P(y | x)``, finite even where the posterior underflows to 0.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    posterior_val: torch.Tensor | None = None
    posterior_test: torch.Tensor | None = None
    bayes_logits: Callable[[torch.Tensor], torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> "Dataset":
        """A copy with every tensor on ``device`` (the same object when already there)."""
        device = torch.device(device)
        if self.x_train.device == device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Dataset(
            self.name,
            self.num_classes,
            self.input_shape,
            *(move(t) for t in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test)),
            posterior_val=move(self.posterior_val),
            posterior_test=move(self.posterior_test),
            bayes_logits=self.bayes_logits,
        )


# --------------------------------------------------------------------------- splits


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(kept, held_out)``: ``round(fraction * n_c)`` of each class c held out, both sorted."""
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        held.append(idx[: int(round(fraction * len(idx)))])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def _finish(
    name: str,
    num_classes: int,
    x_trainval: np.ndarray,
    y_trainval: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    val_fraction: float,
    rng: np.random.Generator,
    standardise: bool,
    posterior: Callable[[np.ndarray], np.ndarray] | None = None,
    bayes_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Dataset:
    """Carve validation from train, standardise with train statistics, convert to tensors."""
    keep, held = stratified_split(y_trainval, val_fraction, rng)
    if len(held) == 0 or len(keep) == 0:
        raise ValueError(
            f"val_fraction: {val_fraction} of {len(y_trainval)} {name} training samples leaves "
            f"{len(keep)} for training and {len(held)} for validation; both need at least one"
        )
    x_tr, y_tr = x_trainval[keep], y_trainval[keep]
    x_va, y_va = x_trainval[held], y_trainval[held]
    x_tr, x_va, x_te = (a.astype(np.float32) for a in (x_tr, x_va, x_test))
    if standardise:
        # Per channel (axis 1) for images, one scalar otherwise; float64 sums for stable stats.
        axes = (0,) + tuple(range(2, x_tr.ndim)) if x_tr.ndim > 2 else None
        mean = x_tr.mean(axis=axes, dtype=np.float64, keepdims=axes is not None)
        std = x_tr.std(axis=axes, dtype=np.float64, keepdims=axes is not None)
        mean, std = np.float32(mean), np.float32(np.where(std > 0, std, 1.0))
        x_tr, x_va, x_te = ((a - mean) / std for a in (x_tr, x_va, x_te))
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt)  # noqa: E731
    post_val = post_test = None
    if posterior is not None:
        post_val = t(posterior(x_va.astype(np.float64)), torch.float64)
        post_test = t(posterior(x_te.astype(np.float64)), torch.float64)
    return Dataset(
        name,
        num_classes,
        tuple(x_tr.shape[1:]),
        t(x_tr, torch.float32),
        t(y_tr, torch.int64),
        t(x_va, torch.float32),
        t(y_va, torch.int64),
        t(x_te, torch.float32),
        t(y_test, torch.int64),
        posterior_val=post_val,
        posterior_test=post_test,
        bayes_logits=bayes_logits,
    )


# --------------------------------------------------------------------------- mnist1d


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # mnist1d's __init__ imports matplotlib; a headless backend keeps that import cheap and display-free.
    import matplotlib

    matplotlib.use("Agg", force=False)
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    # make_dataset reseeds the global `random` and numpy RNGs: restore them so that
    # loading data has no effect on anyone else's random stream.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)  # never get_dataset: it tries the network first
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def _load_mnist1d(*, data_seed: int, dataset_size: int | None, val_fraction: float, data_dir: str | None) -> Dataset:
    x, y, xt, yt = _mnist1d_arrays(5000 if dataset_size is None else dataset_size)
    rng = np.random.default_rng(data_seed)
    # make_dataset already centres and scales the whole set to unit variance.
    return _finish("mnist1d", 10, x, y, xt, yt, val_fraction=val_fraction, rng=rng, standardise=False)


# --------------------------------------------------------------------------- digits


def _load_digits(*, data_seed: int, dataset_size: int | None, val_fraction: float, data_dir: str | None) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images[:, None, :, :] / 16.0).astype(np.float32)  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(data_seed)
    trainval, test = stratified_split(y, TEST_FRACTION, rng)
    return _finish(
        "digits", 10, x[trainval], y[trainval], x[test], y[test], val_fraction=val_fraction, rng=rng, standardise=True
    )


# --------------------------------------------------------------------------- gaussian


def gaussian_means(
    seed: int, *, num_classes: int = GAUSSIAN_CLASSES, dim: int = GAUSSIAN_DIM, spread: float = GAUSSIAN_SPREAD
) -> np.ndarray:
    """Class means ``(num_classes, dim)``, ``mu_k ~ N(0, spread^2 I)``, drawn from ``seed``."""
    return np.random.default_rng([seed, 0]).normal(0.0, spread, size=(num_classes, dim))


def gaussian_sample(means: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws ``y ~ Uniform{0..K-1}``, ``x = mu_y + N(0, I)``: x float64 ``(n, d)``, y int64 ``(n,)``."""
    rng = np.random.default_rng([seed, 1])
    y = rng.integers(0, means.shape[0], size=n)
    x = means[y] + rng.standard_normal((n, means.shape[1]))
    return x, y.astype(np.int64)


def gaussian_posterior(x: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Bayes posterior ``P(y = k | x) = softmax_k(x . mu_k - |mu_k|^2 / 2)``, float64 ``(n, K)``.

    Exact for equal class priors and covariance I: the ``-|x|^2 / 2`` term of every
    class density is the same and cancels in the normalisation.
    """
    logits = x @ means.T - 0.5 * np.sum(means * means, axis=1)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


class GaussianBayesLogits:
    """``x . mu_k - |mu_k|^2 / 2`` in torch, float64 ``(n, K)``: the logits of :func:`gaussian_posterior`.

    Works on inputs on any device (the means follow them), so it survives :meth:`Dataset.to`.
    """

    def __init__(self, means: np.ndarray) -> None:
        self.means = torch.from_numpy(np.asarray(means, dtype=np.float64))
        self.bias = -0.5 * (self.means * self.means).sum(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        means, bias = self.means.to(x.device), self.bias.to(x.device)
        return x.reshape(len(x), -1).double() @ means.T + bias


def _load_gaussian(*, data_seed: int, dataset_size: int | None, val_fraction: float, data_dir: str | None) -> Dataset:
    means = gaussian_means(data_seed)
    x, y = gaussian_sample(means, GAUSSIAN_DEFAULT_SIZE if dataset_size is None else dataset_size, data_seed)
    rng = np.random.default_rng([data_seed, 2])
    trainval, test = stratified_split(y, TEST_FRACTION, rng)
    # No standardisation: the posterior is a function of the raw x.
    return _finish(
        "gaussian",
        GAUSSIAN_CLASSES,
        x[trainval],
        y[trainval],
        x[test],
        y[test],
        val_fraction=val_fraction,
        rng=rng,
        standardise=False,
        posterior=lambda a: gaussian_posterior(a, means),
        bayes_logits=GaussianBayesLogits(means),
    )


# --------------------------------------------------------------------------- files on disk


def _unit(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (float32 from the start: CIFAR in float64 would be 1.2 GB)."""
    return images.astype(np.float32) * np.float32(1.0 / 255.0)


_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": (["train"], ["test"]),
}


def expected_files(name: str, data_dir: str) -> list[Path]:
    """The files a disk dataset reads, at the canonical (torchvision) location under ``data_dir``."""
    root = Path(data_dir).expanduser()
    if name in _MNIST_FOLDERS:
        return [root / _MNIST_FOLDERS[name] / "raw" / f for f in _MNIST_FILES.values()]
    if name in _CIFAR_FOLDERS:
        train, test = _CIFAR_FILES[name]
        return [root / _CIFAR_FOLDERS[name] / f for f in train + test]
    raise ValueError(f"dataset: {name!r} is not read from disk")


def _locate(name: str, data_dir: str) -> dict[str, Path]:
    """Map each expected file name to an existing path, accepting ``.gz`` for MNIST files.

    ``data_dir`` is torchvision's ``root`` (the folder holding ``MNIST/`` or
    ``cifar-10-batches-py/``); the dataset folder itself is accepted too.
    """
    found: dict[str, Path] = {}
    missing: list[Path] = []
    for canonical in expected_files(name, data_dir):
        candidates = [canonical, Path(data_dir).expanduser() / canonical.name]
        if name in _MNIST_FOLDERS:
            candidates += [Path(str(c) + ".gz") for c in candidates]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(canonical)
        else:
            found[canonical.name] = hit
    if missing:
        raise FileNotFoundError(
            f"data_dir: dataset {name!r} expects torchvision's on-disk files under {data_dir!r}; missing "
            + ", ".join(str(m) for m in missing)
            + (" (or the same names with .gz)" if name in _MNIST_FOLDERS else "")
        )
    return found


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array (the MNIST file format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"data_dir: {path} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"data_dir: {path} holds IDX type 0x{data[2]:02x}; expected unsigned bytes (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(dims)):
        raise ValueError(f"data_dir: {path} is truncated: header says {dims}, found {len(data) - header} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=2)
def _mnist_arrays(name: str, data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    files = _locate(name, data_dir)
    x, y, xt, yt = (read_idx(files[_MNIST_FILES[k]]) for k in _MNIST_FILES)
    for images, labels, split in ((x, y, "train"), (xt, yt, "test")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"data_dir: {name} {split} files disagree: images {images.shape}, labels {labels.shape}"
            )
    return x[:, None], y.astype(np.int64), xt[:, None], yt.astype(np.int64)


def _load_mnist_like(name: str):
    def load(*, data_seed: int, dataset_size: int | None, val_fraction: float, data_dir: str | None) -> Dataset:
        x, y, xt, yt = _mnist_arrays(name, str(data_dir))
        rng = np.random.default_rng(data_seed)
        return _finish(name, 10, _unit(x), y, _unit(xt), yt, val_fraction=val_fraction, rng=rng, standardise=True)

    return load


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file must not run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"data_dir: refusing to unpickle {module}.{name} from a dataset file")
        if name == "_reconstruct":
            return np.zeros(0).__reduce__()[0]  # numpy's own _reconstruct, whatever module it lives in
        return getattr(np, name)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = _ArrayUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"data_dir: {path} does not hold a CIFAR batch dict")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise ValueError(f"data_dir: {path} lacks the 'data' and {label_key!r} entries of a CIFAR batch")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"data_dir: {path} holds data {data.shape}, labels {labels.shape}; expected (N, 3072), (N,)")
    return data.reshape(-1, 3, 32, 32), labels


@functools.lru_cache(maxsize=2)
def _cifar_arrays(name: str, data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    files = _locate(name, data_dir)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    train_names, test_names = _CIFAR_FILES[name]

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_read_cifar_batch(files[n], label_key) for n in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return (*read(train_names), *read(test_names))


def _load_cifar(name: str):
    def load(*, data_seed: int, dataset_size: int | None, val_fraction: float, data_dir: str | None) -> Dataset:
        x, y, xt, yt = _cifar_arrays(name, str(data_dir))
        rng = np.random.default_rng(data_seed)
        classes = 10 if name == "cifar10" else 100
        return _finish(name, classes, _unit(x), y, _unit(xt), yt, val_fraction=val_fraction, rng=rng, standardise=True)

    return load


# --------------------------------------------------------------------------- registry

DATASETS: dict[str, DatasetInfo] = {
    "mnist1d": DatasetInfo("mnist1d", (40,), 10, from_disk=False, sizable=True, augmentable=False),
    "digits": DatasetInfo("digits", (1, 8, 8), 10, from_disk=False, sizable=False, augmentable=False),
    "gaussian": DatasetInfo("gaussian", (GAUSSIAN_DIM,), GAUSSIAN_CLASSES, from_disk=False, sizable=True,
                            augmentable=False, posterior=True),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, from_disk=True, sizable=False, augmentable=True),
    "fashion_mnist": DatasetInfo("fashion_mnist", (1, 28, 28), 10, from_disk=True, sizable=False, augmentable=True),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, from_disk=True, sizable=False, augmentable=True),
    "cifar100": DatasetInfo("cifar100", (3, 32, 32), 100, from_disk=True, sizable=False, augmentable=True),
}

_LOADERS = {
    "mnist1d": _load_mnist1d,
    "digits": _load_digits,
    "gaussian": _load_gaussian,
    "mnist": _load_mnist_like("mnist"),
    "fashion_mnist": _load_mnist_like("fashion_mnist"),
    "cifar10": _load_cifar("cifar10"),
    "cifar100": _load_cifar("cifar100"),
}


def dataset_info(name: object, *, field: str = "dataset") -> DatasetInfo:
    """What is known about dataset ``name``: an entry of :data:`DATASETS`, or a synthetic language
    ``hmm_v<V>`` / ``ginc_v<V>`` (:mod:`kdbench.experiments.lm_data`).  ``ValueError`` naming ``field`` otherwise."""
    if isinstance(name, str) and name in DATASETS:
        return DATASETS[name]
    from kdbench.experiments import lm_data

    info = lm_data.lm_dataset_info(name, field=field) if isinstance(name, str) else None
    if info is None:
        known = ", ".join(map(repr, DATASETS))
        raise ValueError(f"{field}: expected one of {known}, hmm_v<V> or ginc_v<V> (V >= 3 tokens), got {name!r}")
    return info


def check_available(name: str, data_dir: str | None) -> None:
    """Raise ``FileNotFoundError`` naming ``data_dir`` and the missing files if a disk dataset is absent."""
    if dataset_info(name).from_disk:
        if data_dir is None:
            raise ValueError(f"data_dir: dataset {name!r} is read from disk; expected a directory, got None")
        _locate(name, data_dir)


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    data_seed: int = 0,
    dataset_size: int | None = None,
    val_fraction: float = 0.1,
) -> Dataset:
    """Load ``name`` with its splits fixed by ``data_seed``; CPU tensors.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: torchvision-style root for the disk datasets (ignored otherwise).
        data_seed: seed of the validation (and, where there is no published one, test) split.
        dataset_size: total samples of a generated dataset (mnist1d, gaussian); None = default.
        val_fraction: share of the training split held out, stratified, for validation.
    """
    info = dataset_info(name)
    if info.kind == "lm":
        from kdbench.experiments import lm_data

        return lm_data.load_lm_dataset(name, data_seed=data_seed, dataset_size=dataset_size,  # type: ignore[return-value]
                                       val_fraction=val_fraction)
    check_available(name, data_dir)
    return _LOADERS[name](data_seed=data_seed, dataset_size=dataset_size, val_fraction=val_fraction,
                          data_dir=data_dir)
