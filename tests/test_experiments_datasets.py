"""Datasets: shapes, splits, determinism, and the torchvision on-disk readers (tiny files written here)."""

from __future__ import annotations

import gzip
import os
import pickle
import random

import numpy as np
import pytest
import torch

from kdbench.experiments import datasets as ds
from kdbench.experiments.datasets import DATASETS, load_dataset

GENERATED = ("mnist1d", "digits", "gaussian")


def _all_x(d: ds.Dataset) -> list[torch.Tensor]:
    return [d.x_train, d.x_val, d.x_test]


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


@pytest.mark.parametrize("name", GENERATED)
def test_generated_shapes_and_dtypes(name: str) -> None:
    d = load_dataset(name)
    info = DATASETS[name]
    assert d.input_shape == info.input_shape and d.num_classes == info.num_classes
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == info.input_shape and len(x) == len(y) > 0
        assert int(y.min()) >= 0 and int(y.max()) < info.num_classes
        assert torch.isfinite(x).all()


def test_mnist1d_published_split_sizes() -> None:
    d = load_dataset("mnist1d", val_fraction=0.1)
    assert len(d.y_train) + len(d.y_val) == 4000 and len(d.y_test) == 1000
    assert len(d.y_val) == pytest.approx(400, abs=5)


def test_mnist1d_size_option() -> None:
    d = load_dataset("mnist1d", dataset_size=2000)
    assert len(d.y_train) + len(d.y_val) == 1600 and len(d.y_test) == 400


def test_mnist1d_restores_global_rngs() -> None:
    np.random.seed(123)
    random.seed(123)
    before_np, before_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    ds._mnist1d_arrays.__wrapped__(200)  # make_dataset reseeds both global RNGs to 42
    assert np.random.random() == before_np and random.random() == before_py


@pytest.mark.parametrize("name", GENERATED)
def test_splits_are_disjoint(name: str) -> None:
    d = load_dataset(name)
    train, val, test = (_rows(x) for x in _all_x(d))
    assert not train & val and not train & test and not val & test


@pytest.mark.parametrize("name", GENERATED)
def test_same_seed_same_data(name: str) -> None:
    a, b = load_dataset(name, data_seed=3), load_dataset(name, data_seed=3)
    for xa, xb in zip(_all_x(a), _all_x(b)):
        assert torch.equal(xa, xb)
    assert torch.equal(a.y_val, b.y_val)


@pytest.mark.parametrize("name", GENERATED)
def test_other_seed_other_validation_split(name: str) -> None:
    a, b = load_dataset(name, data_seed=0), load_dataset(name, data_seed=1)
    assert _rows(a.x_val) != _rows(b.x_val)


def test_mnist1d_test_split_is_fixed_by_publication() -> None:
    a, b = load_dataset("mnist1d", data_seed=0), load_dataset("mnist1d", data_seed=5)
    assert torch.equal(a.x_test, b.x_test)


def test_digits_is_stratified() -> None:
    d = load_dataset("digits")
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 1797
    for y in (d.y_val, d.y_test):
        share = torch.bincount(y, minlength=10).double() / len(y)
        overall = torch.bincount(torch.cat([d.y_train, d.y_val, d.y_test]), minlength=10).double() / 1797
        assert (share - overall).abs().max() < 0.02


def test_digits_standardised_on_train() -> None:
    d = load_dataset("digits")
    assert float(d.x_train.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(d.x_train.std()) == pytest.approx(1.0, abs=1e-3)


def test_gaussian_posterior_is_a_distribution() -> None:
    d = load_dataset("gaussian", dataset_size=1000)
    for post, x in ((d.posterior_val, d.x_val), (d.posterior_test, d.x_test)):
        assert post is not None and post.dtype == torch.float64 and post.shape == (len(x), d.num_classes)
        assert torch.allclose(post.sum(1), torch.ones(len(x), dtype=torch.float64))
        assert (post >= 0).all()


def test_only_gaussian_has_a_posterior() -> None:
    assert load_dataset("digits").posterior_test is None


def test_empty_validation_split_rejected() -> None:
    with pytest.raises(ValueError, match=r"^val_fraction: "):
        load_dataset("gaussian", dataset_size=100, val_fraction=0.01)


def test_unknown_dataset_named() -> None:
    with pytest.raises(ValueError, match=r"^dataset: "):
        load_dataset("imagenet")


def test_to_moves_every_tensor() -> None:
    d = load_dataset("gaussian", dataset_size=200)
    assert d.to("cpu") is d
    # A "meta" move copies without memory: every tensor field, posterior included, goes along.
    m = d.to("meta")
    assert all(t.device.type == "meta" for t in (m.x_train, m.y_test, m.posterior_test))


# --------------------------------------------------------------------------- MNIST IDX files


def _write_idx(path: os.PathLike, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def _write_mnist(root, folder: str, n_train: int = 60, n_test: int = 20, compress: bool = False) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        # Each image is constant: label * 20, plus noise in a corner, so the labels can be read back.
        images = np.repeat((labels * 20)[:, None, None], 28, axis=1).repeat(28, axis=2)
        images[:, 0, 0] = rng.integers(0, 255, n)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, compress)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_format(tmp_path, name: str, folder: str, compress: bool) -> None:
    _write_mnist(tmp_path, folder, compress=compress)
    d = load_dataset(name, data_dir=str(tmp_path), val_fraction=0.2)
    assert d.input_shape == (1, 28, 28)
    assert len(d.y_train) == 50 and len(d.y_val) == 10 and len(d.y_test) == 20  # round(0.2 * 6) per class
    # Test order is the file's; its pixel value rises with the label written with it.
    assert torch.equal(d.y_test, torch.arange(20) % 10)
    centre = d.x_test[:, 0, 14, 14]
    assert torch.all(torch.diff(centre[:10]) > 0) and torch.equal(centre[:10], centre[10:])
    assert float(d.x_train.mean()) == pytest.approx(0.0, abs=1e-5)


def test_mnist_accepts_the_raw_folder_itself(tmp_path) -> None:
    _write_mnist(tmp_path, "MNIST")
    d = load_dataset("mnist", data_dir=str(tmp_path / "MNIST" / "raw"))
    assert len(d.y_test) == 20


def test_mnist_missing_files_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^data_dir: .*MNIST/raw/train-images-idx3-ubyte"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_mnist_bad_magic(tmp_path) -> None:
    _write_mnist(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04")
    ds._mnist_arrays.cache_clear()
    with pytest.raises(ValueError, match=r"^data_dir: .*not an IDX file"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_idx_truncated(tmp_path) -> None:
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match=r"^data_dir: .*truncated"):
        ds.read_idx(path)


# --------------------------------------------------------------------------- CIFAR pickles


def _write_cifar(root, name: str, per_file: int = 12, str_keys: bool = False) -> None:
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    if name == "cifar10":
        train, test = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
    else:
        train, test = ["train"], ["test"]
    classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    rng = np.random.default_rng(1)
    for i, fname in enumerate(train + test):
        labels = (np.arange(per_file) * 7 + i) % classes
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        data[:, :1024] = 200  # a bright red channel: per-channel statistics must differ
        entry = {"data": data, label_key: labels.tolist()}
        if not str_keys:  # the original files were pickled by Python 2: bytes keys
            entry = {k.encode(): v for k, v in entry.items()}
        with open(folder / fname, "wb") as f:
            pickle.dump(entry, f)


@pytest.mark.parametrize("str_keys", [False, True], ids=["bytes-keys", "str-keys"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_format(tmp_path, name: str, str_keys: bool) -> None:
    per_file = 12 if name == "cifar10" else 200  # every class at least twice in the training files
    _write_cifar(tmp_path, name, per_file=per_file, str_keys=str_keys)
    ds._cifar_arrays.cache_clear()
    d = load_dataset(name, data_dir=str(tmp_path), val_fraction=0.5)
    n_train_files = 5 if name == "cifar10" else 1
    assert d.input_shape == (3, 32, 32) and d.num_classes == (10 if name == "cifar10" else 100)
    assert len(d.y_train) == len(d.y_val) == per_file * n_train_files // 2 and len(d.y_test) == per_file
    assert torch.equal(d.y_test, torch.tensor((np.arange(per_file) * 7 + n_train_files) % d.num_classes))
    # Channel 0 is constant 200 in every image: standardised per channel it is exactly 0.
    assert torch.all(d.x_train[:, 0] == 0) and float(d.x_train[:, 1].std()) == pytest.approx(1.0, abs=0.01)


def test_cifar_missing_files_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^data_dir: .*cifar-100-python/train"):
        load_dataset("cifar100", data_dir=str(tmp_path))


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_cannot_run_code(tmp_path) -> None:
    _write_cifar(tmp_path, "cifar10")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    ds._cifar_arrays.cache_clear()
    with pytest.raises(pickle.UnpicklingError, match=r"^data_dir: refusing"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_stratified_split_counts() -> None:
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    keep, held = ds.stratified_split(y, 0.1, np.random.default_rng(0))
    assert np.bincount(y[held]).tolist() == [1, 2, 3, 4]
    assert sorted(np.concatenate([keep, held]).tolist()) == list(range(100))
