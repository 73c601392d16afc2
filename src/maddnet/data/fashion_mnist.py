"""Fashion-MNIST from its four IDX ``.gz`` files.

Looked up, in order: the ``root`` argument, ``$MADDNET_FASHION_MNIST``, and the Debian
package path ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
When online, :func:`download` fetches the files from the data set's official mirror.
"""

from __future__ import annotations

import gzip
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np

DEBIAN_PATH = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
ENV_VAR = "MADDNET_FASHION_MNIST"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def find_root(root: str | os.PathLike | None = None) -> Path:
    """The folder that holds the IDX files; raises FileNotFoundError naming what was tried."""
    tried = []
    for candidate in (root, os.environ.get(ENV_VAR), DEBIAN_PATH):
        if candidate is None:
            continue
        path = Path(candidate)
        tried.append(str(path))
        if all((path / name).exists() for name in _FILES["train"] + _FILES["test"]):
            return path
    raise FileNotFoundError(
        "Fashion-MNIST IDX files not found (looked in: " + ", ".join(tried) + "). "
        "Install them with `apt-get install dataset-fashion-mnist`, or pass the folder "
        f"holding {_FILES['train'][0]} etc. as root / set ${ENV_VAR}."
    )


def download(root: str | os.PathLike, base_url: str = DOWNLOAD_URL) -> Path:
    """Fetch the four IDX files into ``root`` (skipping files already there); returns root."""
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    for name in _FILES["train"] + _FILES["test"]:
        target = folder / name
        if target.exists():
            continue
        partial = target.with_suffix(".part")
        with urllib.request.urlopen(base_url + name) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(partial, target)  # never leave a truncated .gz under the real name
    return folder


def is_available(root: str | os.PathLike | None = None) -> bool:
    try:
        find_root(root)
    except FileNotFoundError:
        return False
    return True


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one (optionally gzipped) IDX file of unsigned bytes into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {body.size} values")
    return body.reshape(shape)


def load_arrays(split: str = "train", root: str | os.PathLike | None = None):
    """Images (N, 28, 28) uint8 and labels (N,) int64 of ``split`` ("train" or "test")."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_root(root)
    images_file, labels_file = _FILES[split]
    images = read_idx(folder / images_file)
    labels = read_idx(folder / labels_file).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels
