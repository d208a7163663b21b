"""A short, self-contained demonstration of the default encryption (``msd-fast encrypt-demo``).

Encrypts two synthetic chest-CT slices (:mod:`msd_fast.data.synthetic`) with a consortium key (the dense transform,
per-image block orders), decrypts them, tries a wrong key, checks the exact model-side transform of a small timm ViT,
prints what it did, and writes plain / encrypted / decrypted / wrong-key images side by side.
"""
from __future__ import annotations

import os
import time

import torch

from ..backends import resolve_backend
from ..checks import is_positive_int
from ..data.convert import MAX_IMAGE_SIDE
from ..data.synthetic import MIN_SIZE, synthetic_dataset
from .image_grid import ciphertext_pixels, save_image_columns
from ..keys import Key
from ..protocol.encryption import EncryptionSpec
from ..vit import encrypt_vit


def check_geometry(patch_size: int, size: int) -> None:
    """Refuse a patch size or image side that cannot work (naming the flag), before anything is allocated."""
    for flag, value in (("--patch-size", patch_size), ("--size", size)):
        if not is_positive_int(value):
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    if size < MIN_SIZE:
        raise ValueError(f"--size must be at least {MIN_SIZE}, got {size}")
    if size > MAX_IMAGE_SIDE:
        raise ValueError(f"--size must be at most {MAX_IMAGE_SIDE}, got {size}")
    if size % patch_size:
        raise ValueError(f"--patch-size {patch_size} must divide --size {size}")


def run(out_dir: str = "demo_out", patch_size: int = 16, size: int = 224, key_path: str | None = None) -> dict:
    """Run the demonstration; returns the numbers it printed."""
    check_geometry(patch_size, size)
    key = Key.load(key_path) if key_path else Key.generate()  # a wrong key path fails before anything is written
    os.makedirs(out_dir, exist_ok=True)
    x = synthetic_dataset(2, size=size, n_classes=2).to_tensor()  # a normal slice and one with a round mass
    spec = EncryptionSpec()
    ids = torch.arange(len(x))
    backend = resolve_backend("auto", x.device, "block_mix")
    n_blocks, n_values = (size // patch_size) ** 2, patch_size * patch_size

    y = spec.encrypt(x, key, patch_size, sample_ids=ids)  # the first call also derives the key's matrix
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        spec.encrypt(x, key, patch_size, sample_ids=ids)
        timings.append(time.perf_counter() - start)
    encrypt_ms = min(timings) * 1e3
    back = spec.decrypt(y, key, patch_size, sample_ids=ids)
    wrong = spec.decrypt(y, Key.generate(), patch_size, sample_ids=ids)
    # the model-side transform exists for one block order; per-image orders are shown on the first image's order
    keywide = EncryptionSpec(per_sample=False)

    torch.manual_seed(0)
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=size, patch_size=patch_size, in_chans=1, embed_dim=96, depth=2, num_heads=3,
                              num_classes=4).eval()
    encrypted_model = encrypt_vit(model, key, mean=127.5, std=64.0, **keywide.vit_options())
    with torch.no_grad():
        model_gap = (encrypted_model(keywide.encrypt(x, key, patch_size).float())
                     - model((x.float() - 127.5) / 64.0)).abs().max().item()

    path = os.path.join(out_dir, "encryption_demo.png")
    save_image_columns(path, [("plain", x), ("encrypted", ciphertext_pixels(y)), ("decrypted", back),
                              ("wrong key", wrong)])
    result = dict(
        fingerprint=key.fingerprint, backend=backend, encrypt_ms=encrypt_ms,
        exact=bool(torch.equal(back, x)), wrong_key_changed=float((wrong != x).float().mean()),
        model_gap=model_gap, image=path,
    )
    print(f"key            fingerprint {key.fingerprint} ({'loaded from ' + key_path if key_path else 'fresh'})")
    print(f"images         {tuple(x.shape)} uint8 synthetic chest-CT slices, patch size {patch_size}: {n_blocks} "
          f"blocks of {n_values} values")
    print(f"encryption     {spec.describe()}: every block -> A (x/255 - 1/2), A the key's orthogonal "
          f"{n_values}x{n_values} matrix, then a per-image block order")
    print(f"encrypt        {encrypt_ms:.2f} ms with backend '{backend}' (best of 5, after a first call that derives "
          "the matrix)")
    print(f"decrypt        exact round trip: {result['exact']}")
    print(f"wrong key      {result['wrong_key_changed']:.1%} of pixels differ from the plain image")
    print(f"encrypt_vit    max |m'(encrypt(x)) - m(normalize(x))| = {model_gap:.2e} (ViT depth 2, dim 96, one "
          "key-wide block order)")
    print(f"wrote          {path}")
    return result
