"""Shard files: round trip, safetensors compatibility, integrity checks, atomic writes, compatibility checks."""
import dataclasses
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from msd_fast.protocol.shard_sets import open_shards
from msd_fast.protocol.shards import (ShardError, check_compatible, open_shard, read_metadata, shard_metadata,
                                      write_shard)


def metadata(count=10, item_shape=(1, 8, 8), dtype="uint8", fingerprint="ab" * 32, **changes):
    meta = shard_metadata(mode="image", count=count, item_shape=item_shape, dtype=dtype, patch_size=4,
                          image_size=(8, 8), channels=1, key_fingerprint=fingerprint,
                          encryption={"block_scramble": True, "pixel_shuffle": True, "negpos": False})
    return dataclasses.replace(meta, **changes)


def images(count=10, seed=0):
    return torch.randint(0, 256, (count, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def write(path, data, meta=None, **kwargs):
    return write_shard(path, [data[i:i + 3] for i in range(0, len(data), 3)], meta or metadata(len(data)), **kwargs)


def test_round_trip_streams_batches_and_is_safetensors(tmp_path):
    data = images(10)
    meta = write(tmp_path / "a.shard", data)
    shard = open_shard(tmp_path / "a.shard")
    assert shard.metadata == meta and len(meta.checksum) == 64 and meta.checksum != "0" * 64
    assert torch.equal(shard[0:10], data) and torch.equal(shard[[7, 2]], data[[7, 2]]) and torch.equal(shard[4], data[4])
    assert torch.equal(torch.cat(list(shard.batches(4))), data)
    assert torch.equal(load_file(tmp_path / "a.shard")["data"], data)  # any safetensors reader can open it
    assert list(tmp_path.iterdir()) == [tmp_path / "a.shard"]  # no temporary file left behind
    with pytest.raises(IndexError, match="out of range"):
        shard[[0, 10]]


def test_float_token_shards(tmp_path):
    tokens = torch.randn(5, 4, 6).half()
    meta = shard_metadata(mode="token", count=5, item_shape=(4, 6), dtype="float16", patch_size=4, image_size=(8, 8),
                          channels=1, key_fingerprint="cd" * 32, encryption={"embed_dim": 6})
    write_shard(tmp_path / "t.shard", [tokens], meta)
    assert torch.equal(open_shard(tmp_path / "t.shard")[0:5], tokens)


def test_truncated_tampered_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "a.shard"
    write(path, images(10))
    raw = path.read_bytes()
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(ShardError, match="truncated"):
        open_shard(tmp_path / "short")
    (tmp_path / "long").write_bytes(raw + b"x")
    with pytest.raises(ShardError, match="longer"):
        open_shard(tmp_path / "long")
    tampered = bytearray(raw)
    tampered[-1] ^= 1
    (tmp_path / "tampered").write_bytes(bytes(tampered))
    with pytest.raises(ShardError, match="checksum"):
        open_shard(tmp_path / "tampered")
    open_shard(tmp_path / "tampered", verify=False)  # the header alone is still fine
    (tmp_path / "random").write_bytes(os.urandom(300))
    with pytest.raises(ShardError, match="not an msd_fast shard"):
        open_shard(tmp_path / "random")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ShardError, match="too short"):
        open_shard(tmp_path / "empty")
    save_file({"data": images(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ShardError, match="not an msd_fast shard"):
        open_shard(tmp_path / "plain.safetensors")


def rewrite_metadata(raw: bytes, edit) -> bytes:
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    record = json.loads(header["__metadata__"]["msd_fast"])
    edit(record)
    header["__metadata__"]["msd_fast"] = json.dumps(record)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + length:]


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.update(version=99), "unsupported shard version 99"),
    (lambda r: r.update(count=11), "does not match"),
    (lambda r: r.update(mode="video"), "mode must be"),
    (lambda r: r.update(labels=[1, 2]), "fields differ"),
])
def test_header_edits_are_refused(tmp_path, edit, message):
    path = tmp_path / "a.shard"
    write(path, images(10))
    (tmp_path / "edited").write_bytes(rewrite_metadata(path.read_bytes(), edit))
    with pytest.raises(ShardError, match=message):
        read_metadata(tmp_path / "edited")


def test_writer_checks_batches_and_never_leaves_partial_files(tmp_path):
    path = tmp_path / "a.shard"
    with pytest.raises(ShardError, match="written"):
        write(path, images(7), metadata(count=10))
    with pytest.raises(ShardError, match="batches must be"):
        write_shard(path, [images(10).float()], metadata())
    with pytest.raises(ShardError, match="more than"):
        write(path, images(12), metadata(count=10))

    def failing():
        yield images(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shard(path, failing(), metadata())
    assert list(tmp_path.iterdir()) == []
    write(path, images(10))
    with pytest.raises(FileExistsError, match="overwrite"):
        write(path, images(10, seed=1))
    assert torch.equal(open_shard(path)[0:10], images(10))
    write(path, images(10, seed=1), overwrite=True)
    assert torch.equal(open_shard(path)[0:10], images(10, seed=1))


def test_compatibility_names_what_differs(tmp_path):
    write(tmp_path / "a", images(10))
    write(tmp_path / "b", images(4), metadata(count=4, client="other"))
    shards, meta = open_shards([tmp_path / "a", tmp_path / "b"])
    assert meta.count == 10 and sum(len(s) for s in shards) == 14
    write(tmp_path / "c", images(10), metadata(fingerprint="ef" * 32))
    with pytest.raises(ShardError, match="different key"):
        open_shards([tmp_path / "a", tmp_path / "c"])
    write(tmp_path / "d", images(10), metadata(patch_size=2))
    with pytest.raises(ShardError, match="patch_size"):
        check_compatible([open_shard(tmp_path / "a"), open_shard(tmp_path / "d")])
    with pytest.raises(ShardError, match="no shards"):
        check_compatible([])
