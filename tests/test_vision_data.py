"""Vision data: IDX parsing, the Fashion-MNIST and ImageNet DataModules, timm transforms."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.vision.data import (
    DEBIAN_FASHION_MNIST,
    DataNotFoundError,
    FakeImageDataModule,
    FashionMNISTDataModule,
    ImageNetDataModule,
    _posterize_compat,
    check_imagenet_root,
    find_fashion_mnist,
    read_idx,
)

HAVE_FMNIST = Path(DEBIAN_FASHION_MNIST).is_dir()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_fmnist(root: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}",
                  rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n), gz)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("x.idx.gz" if gz else "x.idx")
    write_idx(p, arr, gz)
    np.testing.assert_array_equal(read_idx(p), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "bad")


def test_find_fashion_mnist_layouts(tmp_path):
    assert find_fashion_mnist(tmp_path) is None
    fake_fmnist(tmp_path / "FashionMNIST" / "raw", gz=False)  # torchvision's layout
    files = find_fashion_mnist(tmp_path)
    assert files is not None and set(files) == {"train", "test"}


@pytest.mark.skipif(not HAVE_FMNIST, reason=f"{DEBIAN_FASHION_MNIST} absent "
                    "(apt-get install dataset-fashion-mnist; make install does it)")
def test_real_fashion_mnist_idx_files():
    files = find_fashion_mnist(DEBIAN_FASHION_MNIST)
    assert files is not None
    x, y = read_idx(files["train"][0]), read_idx(files["train"][1])
    xt, yt = read_idx(files["test"][0]), read_idx(files["test"][1])
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and y.shape == (60000,)
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    assert set(np.unique(y)) == set(range(10)) and np.bincount(yt).tolist() == [1000] * 10
    assert abs(x.mean() / 255 - 0.2860) < 1e-3  # the mean used in conf/data/fashion_mnist.yaml

    dm = FashionMNISTDataModule(subset_train=256, subset_val=64, subset_test=64, batch_size=32,
                                download=False)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (256, 64, 64)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (32, 1, 28, 28) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (32, 1, 28, 28)


def test_fashion_mnist_splits_are_fixed_and_disjoint(tmp_path):
    fake_fmnist(tmp_path, n_train=100, n_test=30)
    kw = dict(root=str(tmp_path), download=False, download_root=None, val_size=20,
              subset_train=50, subset_val=10, subset_test=15, batch_size=10)
    a, b = FashionMNISTDataModule(**kw), FashionMNISTDataModule(**kw)
    a.setup()
    b.setup()
    assert (len(a.data_train), len(a.data_val), len(a.data_test)) == (50, 10, 15)
    np.testing.assert_array_equal(a.data_train.images, b.data_train.images)  # data_seed fixed
    train = {x.tobytes() for x in a.data_train.images}
    assert not any(x.tobytes() in train for x in a.data_val.images)
    img, label = a.data_val[0]
    assert img.shape == (1, 28, 28) and isinstance(label, int)


def test_fashion_mnist_missing_gives_clear_error(tmp_path):
    dm = FashionMNISTDataModule(root=str(tmp_path / "nowhere"), download=False,
                                download_root=str(tmp_path / "dl"))
    with pytest.raises(DataNotFoundError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "data.root" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg


def test_train_transform_is_timm_pipeline_on_grayscale():
    dm = FakeImageDataModule(num_train=8, num_val=4, num_test=4, batch_size=4)
    tf = dm.train_transform()
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip",
                         "RandAugment"]
    assert "RandomErasing" in names
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    for _ in range(50):
        out = tf(img)
        assert out.shape == (1, 28, 28)
    assert dm.eval_transform()(img).shape == (1, 28, 28)


def test_posterize_compat_zero_bits():
    # rand-m9-mstd0.5 reaches magnitude 10 -> keep 0 bits; Pillow >= 12 raises, we return black
    img = Image.fromarray(np.full((4, 4), 200, dtype=np.uint8))
    assert np.asarray(_posterize_compat(img, 0)).max() == 0
    assert np.asarray(_posterize_compat(img, 1)).max() == 128
    assert _posterize_compat(img, 8) is img


def test_imagenet_root_errors(tmp_path):
    for root in (None, "", str(tmp_path / "missing")):
        with pytest.raises(DataNotFoundError) as e:
            check_imagenet_root(root)
        msg = str(e.value)
        assert "data.root" in msg and "PRESET=tiny" in msg
    with pytest.raises(DataNotFoundError, match="missing"):
        ImageNetDataModule(root=str(tmp_path / "missing"))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataNotFoundError, match="no class folders"):
        check_imagenet_root(tmp_path)


def test_imagenet_datamodule_on_a_small_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    d / f"{i}.png")
    dm = ImageNetDataModule(root=str(tmp_path), img_size=32, num_classes=2, batch_size=4,
                            num_workers=0)
    dm.setup()
    assert not dm.has_test
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 32, 32)
    bad = ImageNetDataModule(root=str(tmp_path), img_size=32, num_classes=1000)
    with pytest.raises(ValueError, match="classes"):
        bad.setup()
