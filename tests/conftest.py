"""Test configuration: Triton kernels run in the numpy interpreter when no GPU is present (set before triton is
imported), so CI on CPU exercises every Triton kernel; ``gpu`` tests are skipped without CUDA."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


DOWNSTREAM_SECRET = b"downstream test key"


@pytest.fixture(scope="session")
def exported_backbones(tmp_path_factory):
    """Tiny pretrained backbones for the downstream tests, made the way a consortium makes them: 40 synthetic
    32x32 scans encoded with :func:`msd_fast.client.encode.encode_dataset` (image mode with negative-positive, and token
    mode), pretrained for one epoch (ViT depth 1, width 24, patch 8), exported. Returns ``{"image": path,
    "token": path, "secret": bytes}`` (the key is ``Key.from_secret(secret)``)."""
    from msd_fast import Key
    from msd_fast.client.encode import encode_dataset
    from msd_fast.protocol.encryption import EncryptionSpec
    from msd_fast.data import synthetic_dataset
    from msd_fast.server import PretrainConfig, export_backbone, pretrain

    folder = tmp_path_factory.mktemp("exported")
    key = Key.from_secret(DOWNSTREAM_SECRET)
    images = synthetic_dataset(40, size=32)
    paths = {"secret": DOWNSTREAM_SECRET}
    for mode in ("image", "token"):
        shard = str(folder / f"{mode}.shard")
        # key-wide block order: the encrypted-domain classifier needs one fixed order to encrypt new images with
        encryption = EncryptionSpec(per_sample=False) if mode == "image" else None
        encode_dataset(images, key, shard, patch_size=8, mode=mode, encryption=encryption, embed_dim=24,
                       sample_id_start=0, progress=False)
        pretrain(PretrainConfig(shards=[shard], out=str(folder / mode), depth=1, embed_dim=24, num_heads=2,
                                drop_path=0.0, out_dim=32, head_hidden_dim=32, head_bottleneck_dim=16, local_views=1,
                                epochs=1, batch_size=16, warmup_epochs=0, progress=False))
        paths[mode] = str(folder / f"{mode}.safetensors")
        export_backbone(str(folder / mode / "checkpoint.pt"), paths[mode])
    return paths
