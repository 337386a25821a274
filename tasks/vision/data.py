"""Image-classification DataModules with timm's augmentation pipeline (paper App. C.2, Table 9).

- :class:`ImageNetDataModule`: ImageNet-1k from an ImageFolder root (``root/train``,
  ``root/val``); the paper's numbers are ImageNet *val* numbers, so there is no test split.
- :class:`FashionMNISTDataModule`: Fashion-MNIST for the ``tiny`` preset: the IDX files of the
  Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), or of any
  folder given as ``root`` (torchvision's ``FashionMNIST/raw`` layout is found too), else
  torchvision's download when a network exists, else a clear error. Validation is a fixed
  held-out part of the official train split, test the official test split.
- :class:`FakeImageDataModule`: random images through the same pipeline, for tests.

Training transforms are ``timm.data.create_transform(is_training=True, ...)``: random resized
crop, horizontal flip, RandAugment ``rand-m9-mstd0.5-inc1``, normalisation, random erasing 0.25
(pixel mode); mixup/cutmix and label smoothing live in the LightningModule (they act on batches).

Grayscale: Fashion-MNIST stays single-channel. timm's RandAugment operates on PIL ``'L'`` images
as they are (checked: every op of ``rand-m9-mstd0.5-inc1`` runs, ~0.2 ms per 28x28 image), and
normalisation uses the one-channel mean/std of the data, so models take ``in_chans=1``. No
``'L' -> 'RGB' -> 'L'`` round trip is needed.
"""

from __future__ import annotations

import functools
import gzip
import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from tasks.core.data import train_loader
from tasks.core.errors import DataNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# statistics of the Fashion-MNIST train split (pixel values / 255)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# ---------------------------------------------------------------------------------------
# timm RandAugment vs. Pillow >= 12
# ---------------------------------------------------------------------------------------
def _posterize_compat(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, valid for ``bits_to_keep = 0`` on every Pillow.

    ``rand-m9-mstd0.5`` samples magnitudes up to 10, where ``PosterizeIncreasing`` keeps 0 bits.
    Older Pillow returned a black image for that; Pillow >= 12 raises ``ValueError`` (seen with
    timm 1.0.31 and Pillow 13, in about 1 of 400 images). Keep the old behaviour.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    from PIL import ImageOps

    return ImageOps.posterize(img, int(bits_to_keep))


def patch_rand_augment(transform: Any) -> Any:
    """Swap timm's posterize for :func:`_posterize_compat` in the RandAugment ops of
    ``transform`` (a torchvision ``Compose`` from ``timm.data.create_transform``)."""
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", [transform]):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize_compat
    return transform


# ---------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------
class ArrayImageDataset(Dataset):
    """``uint8`` images ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)`` with integer labels, served
    as PIL images through ``transform`` (timm's transforms take PIL images)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 (N,H,W[,3]), got {images.dtype} "
                             f"{images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format, optionally gzipped) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, file holds {arr.size} elements")
    return arr.reshape(dims)


def find_fashion_mnist(root: str | os.PathLike) -> dict[str, tuple[Path, Path]] | None:
    """The four IDX files under ``root`` (plain or ``.gz``; also ``root/FashionMNIST/raw``, the
    torchvision layout), or ``None`` if any is missing."""
    root = Path(root).expanduser()
    for base in (root, root / "FashionMNIST" / "raw"):
        found: dict[str, tuple[Path, Path]] = {}
        for split, names in _FMNIST_FILES.items():
            paths = []
            for name in names:
                cand = [base / name, base / f"{name}.gz"]
                hit = next((p for p in cand if p.is_file()), None)
                if hit is None:
                    break
                paths.append(hit)
            if len(paths) == 2:
                found[split] = (paths[0], paths[1])
        if len(found) == 2:
            return found
    return None


def _fashion_mnist_missing(root: str, download_root: str | None, reason: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"Fashion-MNIST not found at data.root={root!r} ({reason}). Expected the IDX files "
        f"train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz],"
        f" t10k-labels-idx1-ubyte[.gz]. Ways forward: install the Debian package "
        f"(`apt-get install dataset-fashion-mnist`, which `make install` tries; it puts them in "
        f"{DEBIAN_FASHION_MNIST}), or set data.root=/folder/with/the/idx/files, or allow a "
        f"download with data.download=true on a machine with network access "
        f"(into data.download_root={download_root!r})."
    )


def load_fashion_mnist(root: str, download: bool = False, download_root: str | None = None,
                       timeout: float = 20.0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}`` as uint8 / int64 arrays.

    Cached per process (a Hydra multirun trains many models in one process); the arrays are
    read-only views shared by every caller.
    """
    return _load_fashion_mnist(str(root), bool(download),
                               None if download_root is None else str(download_root), timeout)


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist(root: str, download: bool, download_root: str | None,
                        timeout: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    files = find_fashion_mnist(root)
    if files is None and download_root:
        files = find_fashion_mnist(download_root)
    if files is None:
        if not download:
            raise _fashion_mnist_missing(root, download_root, "download disabled")
        if not download_root:
            raise _fashion_mnist_missing(root, download_root, "no data.download_root set")
        from torchvision.datasets import FashionMNIST

        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)
        try:
            for train in (True, False):
                FashionMNIST(download_root, train=train, download=True)
        except Exception as e:  # no network, proxy, mirror down, ...
            raise _fashion_mnist_missing(root, download_root,
                                         f"download failed: {type(e).__name__}: {e}") from e
        finally:
            socket.setdefaulttimeout(old)
        files = find_fashion_mnist(download_root)
        if files is None:
            raise _fashion_mnist_missing(root, download_root, "download left no IDX files")
    out = {}
    for split, (img_path, lbl_path) in files.items():
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(f"unexpected Fashion-MNIST shapes {images.shape} / {labels.shape}")
        images = np.ascontiguousarray(images, dtype=np.uint8)
        labels = labels.astype(np.int64)
        images.flags.writeable = labels.flags.writeable = False
        out[split] = (images, labels)
    return out


def check_imagenet_root(root: str | os.PathLike | None) -> Path:
    """``root`` if it holds an ImageFolder ``train/`` and ``val/``; else a clear error."""
    hint = (
        "Ways forward: point data.root at an ImageNet-1k ImageFolder (root/train/<wnid>/*.JPEG "
        "and root/val/<wnid>/*.JPEG; with make: `make reproduce-table2 DATA_ROOT=/path/to/"
        "imagenet`, or export IMAGENET_ROOT), or run the small CPU version of the experiment on "
        "Fashion-MNIST with PRESET=tiny (`make reproduce-table2 PRESET=tiny`, or "
        "`preset=vision/tiny` on the command line)."
    )
    if root is None or str(root).strip() == "":
        raise DataNotFoundError(f"ImageNet root is not set (data.root is empty). {hint}")
    path = Path(str(root)).expanduser()
    missing = [s for s in ("train", "val") if not (path / s).is_dir()]
    if missing:
        raise DataNotFoundError(
            f"ImageNet not found at data.root={str(root)!r}: "
            f"{', '.join(str(path / m) for m in missing)} missing. {hint}"
        )
    for s in ("train", "val"):
        if not any(p.is_dir() for p in (path / s).iterdir()):
            raise DataNotFoundError(
                f"ImageNet at data.root={str(root)!r}: {path / s} has no class folders. {hint}")
    return path


# ---------------------------------------------------------------------------------------
# DataModules
# ---------------------------------------------------------------------------------------
class ImageDataModule(L.LightningDataModule):
    """Shared transform/loader plumbing. Subclasses fill ``self.data_{train,val,test}``.

    Augmentation args are timm's ``create_transform`` arguments: ``auto_augment`` (RandAugment
    policy string), ``re_prob``/``re_mode``/``re_count`` (random erasing), ``scale``/``ratio``
    (random resized crop), ``hflip``, ``interpolation``; ``crop_pct`` is the eval centre crop.
    """

    has_test: bool = True

    def __init__(
        self,
        *,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        re_count: int = 1,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed = seed  # data order and augmentation draws (the run's seed)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean/std need {in_chans} entries (in_chans), got {mean} / {std}")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.aug = dict(auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode,
                        re_count=re_count, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
                        interpolation=interpolation)
        self.crop_pct = crop_pct
        self.data_train = self.data_val = self.data_test = None

    def train_transform(self):
        tf = create_transform(input_size=(self.in_chans, self.img_size, self.img_size),
                              is_training=True, mean=self.mean, std=self.std, **self.aug)
        return patch_rand_augment(tf)

    def eval_transform(self):
        return create_transform(input_size=(self.in_chans, self.img_size, self.img_size),
                                is_training=False, mean=self.mean, std=self.std,
                                interpolation=self.aug["interpolation"], crop_pct=self.crop_pct)

    def _loader(self, ds, train: bool) -> DataLoader:
        if train:  # seeded, shardable and resumable (tasks.core.data)
            return train_loader(ds, batch_size=self.batch_size, seed=self.seed, shuffle=True,
                                drop_last=True,  # mixup needs an even, fixed batch size
                                num_workers=self.num_workers, pin_memory=self.pin_memory,
                                persistent_workers=self.persistent_workers)
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers,
                          pin_memory=self.pin_memory and torch.cuda.is_available(),
                          persistent_workers=self.persistent_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, False)

    def test_dataloader(self) -> DataLoader:
        if self.data_test is None:
            raise RuntimeError(f"{type(self).__name__} has no test split")
        return self._loader(self.data_test, False)


def _subset(n: int, size: int | None, rng: np.random.Generator) -> np.ndarray:
    idx = rng.permutation(n)
    return np.sort(idx[:size]) if size is not None and size < n else np.arange(n)


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (10 classes, 28x28 grayscale) through the same timm pipeline.

    Args:
        root: folder with the IDX files (default: the Debian package's folder).
        download: fall back to torchvision's download into ``download_root`` when ``root``
            lacks the files.
        val_size: images of the official train split held out for validation (fixed by
            ``data_seed``, disjoint from training).
        subset_train / subset_val / subset_test: use only this many images of each split
            (a fixed random subset drawn with ``data_seed``; ``None`` = all) - the tiny budget.
        data_seed: seed of the split and subsets; independent of the run's seed so that every
            run of a sweep sees the same images.
    """

    def __init__(
        self,
        root: str = DEBIAN_FASHION_MNIST,
        download: bool = True,
        download_root: str | None = "~/.cache/chimera/fashion-mnist",
        val_size: int = 5000,
        subset_train: int | None = None,
        subset_val: int | None = None,
        subset_test: int | None = None,
        data_seed: int = 0,
        img_size: int = 28,
        in_chans: int = 1,
        num_classes: int = 10,
        mean: Sequence[float] = FASHION_MNIST_MEAN,
        std: Sequence[float] = FASHION_MNIST_STD,
        crop_pct: float = 1.0,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                         mean=mean, std=std, crop_pct=crop_pct, num_workers=num_workers,
                         **kwargs)
        if in_chans != 1:
            raise ValueError("Fashion-MNIST is grayscale: in_chans must be 1")
        self.root = str(root)
        self.download = download
        self.download_root = str(Path(download_root).expanduser()) if download_root else None
        self.val_size, self.data_seed = val_size, data_seed
        self.subsets = (subset_train, subset_val, subset_test)

    def prepare_data(self) -> None:
        # fails early (before the model is built) with the message on how to get the data
        load_fashion_mnist(self.root, self.download, self.download_root)

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        data = load_fashion_mnist(self.root, self.download, self.download_root)
        (x, y), (xt, yt) = data["train"], data["test"]
        rng = np.random.default_rng(self.data_seed)
        perm = rng.permutation(len(x))
        val_idx, train_idx = perm[:self.val_size], perm[self.val_size:]
        sub_train, sub_val, sub_test = self.subsets
        train_idx = train_idx[_subset(len(train_idx), sub_train, rng)]
        val_idx = val_idx[_subset(len(val_idx), sub_val, rng)]
        test_idx = _subset(len(xt), sub_test, rng)
        tf_train, tf_eval = self.train_transform(), self.eval_transform()
        self.data_train = ArrayImageDataset(x[train_idx], y[train_idx], tf_train)
        self.data_val = ArrayImageDataset(x[val_idx], y[val_idx], tf_eval)
        self.data_test = ArrayImageDataset(xt[test_idx], yt[test_idx], tf_eval)


class FakeImageDataModule(ImageDataModule):
    """Random ``uint8`` images (with a class-dependent brightness, so that there is something to
    learn) through the same pipeline; for tests and smoke runs."""

    def __init__(self, num_train: int = 64, num_val: int = 32, num_test: int = 32,
                 img_size: int = 28, in_chans: int = 1, num_classes: int = 10,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 crop_pct: float = 1.0, data_seed: int = 0, num_workers: int = 0,
                 **kwargs: Any) -> None:
        mean = tuple(mean) if mean is not None else (0.5,) * in_chans
        std = tuple(std) if std is not None else (0.25,) * in_chans
        super().__init__(img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                         mean=mean, std=std, crop_pct=crop_pct, num_workers=num_workers,
                         **kwargs)
        if in_chans not in (1, 3):
            raise ValueError("fake images are grayscale (1) or RGB (3)")
        self.sizes = (num_train, num_val, num_test)
        self.data_seed = data_seed

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        rng = np.random.default_rng(self.data_seed)
        shape = (self.img_size, self.img_size) + ((3,) if self.in_chans == 3 else ())
        splits = []
        for n in self.sizes:
            y = rng.integers(0, self.num_classes, n)
            base = (y * (200 // max(1, self.num_classes - 1)))[:, None, None]
            if self.in_chans == 3:
                base = base[..., None]
            x = np.clip(base + rng.integers(0, 56, (n, *shape)), 0, 255).astype(np.uint8)
            splits.append((x, y))
        tf_train, tf_eval = self.train_transform(), self.eval_transform()
        self.data_train = ArrayImageDataset(*splits[0], tf_train)
        self.data_val = ArrayImageDataset(*splits[1], tf_eval)
        self.data_test = ArrayImageDataset(*splits[2], tf_eval)


class ImageNetDataModule(ImageDataModule):
    """ImageNet-1k from an ImageFolder root (``root/train/<wnid>/*``, ``root/val/<wnid>/*``).

    The root is checked on construction, so a wrong ``data.root`` stops a run before anything
    is built. ImageNet's val split is the paper's evaluation split; there is no test split.
    """

    has_test = False

    def __init__(self, root: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = check_imagenet_root(root)

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        from torchvision.datasets import ImageFolder

        self.data_train = ImageFolder(str(self.root / "train"), transform=self.train_transform())
        self.data_val = ImageFolder(str(self.root / "val"), transform=self.eval_transform())
        n = len(self.data_train.classes)
        if n != self.num_classes:
            raise ValueError(f"{self.root / 'train'} has {n} classes, data.num_classes is "
                             f"{self.num_classes}")
