"""Dataset loading: idx(.gz) files (MNIST / Fashion-MNIST layout) or numpy .npz.

Images are returned as uint8 arrays [N, H, W] (gray) or [N, H, W, C]; labels as int64 [N].
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENV_DIR = "SPOTLIGHT_FASHION_MNIST_DIR"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package location; override by flag/env

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=_IDX_DTYPES[dtype_code], offset=4 + 4 * ndim)
    return arr.reshape(dims).copy()


def _find(directory: Path, stem: str) -> Path:
    for cand in (stem + ".gz", stem):
        p = directory / cand
        if p.exists():
            return p
    raise FileNotFoundError(f"{stem}[.gz] not found in {directory}")


@dataclass
class Dataset:
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str

    @property
    def image_shape(self):
        """(C, H, W)"""
        im = self.train_images
        return (1, im.shape[1], im.shape[2]) if im.ndim == 3 else (im.shape[3], im.shape[1], im.shape[2])


def resolve_data_dir(flag: str | None) -> str:
    return flag or os.environ.get(ENV_DIR) or DEFAULT_DIR


def load_dataset(source: str | None) -> Dataset:
    """`source` is a directory with idx files ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz])
    or an .npz with train_images, train_labels, test_images, test_labels (uint8 images)."""
    src = resolve_data_dir(source)
    p = Path(src)
    if p.is_file() and p.suffix == ".npz":
        z = np.load(p)
        ds = Dataset(z["train_images"], z["train_labels"].astype(np.int64),
                     z["test_images"], z["test_labels"].astype(np.int64), str(p))
    elif p.is_dir():
        ds = Dataset(read_idx(_find(p, "train-images-idx3-ubyte")),
                     read_idx(_find(p, "train-labels-idx1-ubyte")).astype(np.int64),
                     read_idx(_find(p, "t10k-images-idx3-ubyte")),
                     read_idx(_find(p, "t10k-labels-idx1-ubyte")).astype(np.int64), str(p))
    else:
        raise FileNotFoundError(f"dataset not found: {src} (use --data or ${ENV_DIR})")
    for name in ("train_images", "test_images"):
        if getattr(ds, name).dtype != np.uint8:
            raise ValueError(f"{name} must be uint8")
    return ds


def split_train_val(n: int, val_size: int, seed: int):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def to_nchw_float(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W] or [N,H,W,C] -> float32 [N,C,H,W] in [0, 1]."""
    x = images.astype(np.float32) / 255.0
    if x.ndim == 3:
        return x[:, None]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def channel_stats(images: np.ndarray):
    x = to_nchw_float(images)
    return ([round(float(v), 4) for v in x.mean(axis=(0, 2, 3))],
            [round(float(v), 4) for v in x.std(axis=(0, 2, 3))])
