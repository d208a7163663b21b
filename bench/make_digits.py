"""Write scikit-learn's digits (1,797 real 8x8 scans of handwritten digits, shipped with the package: no download)
as a class-folder tree of 32x32 grayscale PNGs, the real image set the demo's claims are checked on.

    python bench/make_digits.py OUT_FOLDER [--size 32]
    msd-fast demo --data OUT_FOLDER
"""
import argparse
import os

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to create (one sub-folder per digit)")
    parser.add_argument("--size", type=int, default=32, help="side of the written images (bilinear; default 32)")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    digits = load_digits()
    if os.path.exists(args.out) and os.listdir(args.out):
        parser.error(f"{args.out} exists and is not empty")
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = os.path.join(args.out, str(label))
        os.makedirs(folder, exist_ok=True)
        pixels = (image / 16.0 * 255).round().astype(np.uint8)
        Image.fromarray(pixels).resize((args.size, args.size), Image.BILINEAR).save(
            os.path.join(folder, f"{index:04d}.png"))
    print(f"wrote {len(digits.images)} images of {args.size}x{args.size} to {args.out}")


if __name__ == "__main__":
    main()
