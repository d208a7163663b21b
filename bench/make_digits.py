"""Write sklearn's digits (1797 real 8x8 scans of handwritten digits) as a 32x32 PNG class-folder tree."""
import os, sys
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

out = sys.argv[1]
d = load_digits()
for i, (img, y) in enumerate(zip(d.images, d.target)):
    folder = os.path.join(out, str(y)); os.makedirs(folder, exist_ok=True)
    a = (img / 16.0 * 255).round().astype(np.uint8)
    Image.fromarray(a).resize((32, 32), Image.BILINEAR).save(os.path.join(folder, f"{i:04d}.png"))
