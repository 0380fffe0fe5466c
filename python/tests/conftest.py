import sys
from pathlib import Path

import numpy as np
import pytest

PY = Path(__file__).resolve().parents[1]
REPO = PY.parent
if str(PY) not in sys.path:
    sys.path.insert(0, str(PY))

from spotlight_model.data import load_dataset  # noqa: E402


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory):
    """A small deterministic subset of the real dataset ($SPOTLIGHT_FASHION_MNIST_DIR or the
    Debian package location): 640 training images (512 train + 128 val) and 500 test images."""
    ds = load_dataset(None)
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, train_images=ds.train_images[:640], train_labels=ds.train_labels[:640],
             test_images=ds.test_images[:500], test_labels=ds.test_labels[:500])
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory, small_npz):
    """Smoke training (1 epoch on 512 images, both models) + export + evaluate via the CLI."""
    from spotlight_model.cli import main
    root = tmp_path_factory.mktemp("run")
    work, out = root / "work", root / "pkg"
    common = ["--data", str(small_npz), "--work", str(work), "--out", str(out)]
    main(["train", *common, "--epochs", "1", "--limit", "512", "--val-size", "128"])
    main(["export", *common])
    main(["evaluate", *common, "--results", str(root / "results.json")])
    return {"work": work, "pkg": out, "results": root / "results.json", "data": small_npz}
