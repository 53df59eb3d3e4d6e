"""Write scikit-learn's 8x8 digits as an ImageFolder, the data of ``declared.yaml``.

    python examples/make_digits_imagefolder.py            # writes examples/digits/{train,val,test}/<digit>/*.png

An ImageFolder is one directory per split holding one sub-directory per class; each class
folder's rank in sorted order is its label. Offline: scikit-learn ships the digits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def make_imagefolder(out: str | Path) -> Path:
    """1,797 grayscale 8x8 PNGs: 60% train, 20% val, 20% test (a seeded split); returns ``out``."""
    out = Path(out)
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    n_train, n_val = int(0.6 * len(order)), int(0.2 * len(order))
    splits = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    for split, indices in splits.items():
        for i in indices:
            folder = out / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # digits are 0..16
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=Path(__file__).parent / "digits", type=Path,
                        help="where to write the ImageFolder (default: examples/digits)")
    print(f"wrote {make_imagefolder(parser.parse_args().out)}")
