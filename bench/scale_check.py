"""Does encoding and loading scale past memory? Encodes N generated 224x224 one-channel scans into a shard set and
reads it back as the pretraining server does, measuring images/s and the peak resident memory of each.

Two phases, each in a fresh process so each peak is its own (``VmHWM`` of ``/proc/self/status``, the kernel's
high-water mark of resident memory, file-backed pages included; ``ru_maxrss`` agrees):

* ``encode``: :func:`msd_fast.client.encode.encode_dataset` of a lazily generated source (no image exists before the
  encoder reads it) with the default encryption (dense transform, per-image block order, float16) into parts of at
  most ``--max-shard-size``;
* ``load``: :class:`msd_fast.server.data.ShardDataset` opens the folder (format, length and SHA-256 of every part),
  computes ``input_stats`` and reads one shuffled epoch of batches with ``take`` -- everything the server does with
  the data except the model.

The target is at most 2 GB peak for both at 100,000 images (float16 ciphertext: 100 KB per image, about 10 GB on
disk; the disk is checked first and the output deleted afterwards unless ``--keep``). The parent process then checks
the first and last images decrypt exactly (with the key, which the load phase never opens).

    python -m bench.scale_check --images 100000 --json bench/results/<date>-scale-100k.json
    python -m bench.scale_check --images 64 --size 32 --max-shard-size 50kB   # a smoke run (the test)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

TARGET_BYTES = 2 * 10**9


class GeneratedScans:
    """An :class:`~msd_fast.data.ImageSet` reader whose image ``i`` is made when read: a fixed body disc plus noise
    from a PCG64 stream seeded by ``i`` (uint8 ``[C, size, size]``), so any row re-reads identically."""

    def __init__(self, n: int, size: int, channels: int = 1):
        self.n, self.size, self.channels = n, size, channels
        y, x = np.mgrid[:size, :size] / max(size - 1, 1) - 0.5
        self._body = np.where(x * x + y * y < 0.2, 150, 20).astype(np.uint8)

    @property
    def geometry(self) -> tuple[int, int, int]:
        return self.channels, self.size, self.size

    def __len__(self) -> int:
        return self.n

    def read(self, rows: np.ndarray) -> torch.Tensor:
        out = np.empty((len(rows), self.channels, self.size, self.size), dtype=np.uint8)
        for i, row in enumerate(rows):
            noise = np.random.Generator(np.random.PCG64(int(row))).integers(0, 64, out.shape[1:], dtype=np.uint8)
            out[i] = self._body + noise
        return torch.from_numpy(out)

    def describe(self) -> str:
        return f"{self.n} generated {self.size}x{self.size} scans"


def peak_memory() -> dict:
    """This process's peak resident memory: ``VmHWM`` (bytes) and ``ru_maxrss`` (bytes, Linux reports KiB)."""
    hwm = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return {"vm_hwm_bytes": hwm, "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def encode_phase(args: argparse.Namespace) -> dict:
    from msd_fast import Key
    from msd_fast.client.encode import encode_dataset
    from msd_fast.data import ImageSet

    before = peak_memory()["vm_hwm_bytes"]
    key = Key.load(args.key)
    images = ImageSet(GeneratedScans(args.images, args.size, args.channels))
    start = time.perf_counter()
    meta = encode_dataset(images, key, args.out, patch_size=args.patch_size, sample_id_start=0,
                          batch_size=args.batch_size, max_shard_size=args.max_shard_size, progress=args.progress)
    seconds = time.perf_counter() - start
    return {"phase": "encode", "images": meta.count, "seconds": seconds, "images_per_s": meta.count / seconds,
            "hwm_after_imports_bytes": before, **peak_memory()}


def load_phase(args: argparse.Namespace) -> dict:
    from msd_fast.server.data import ShardDataset, epoch_batches

    before = peak_memory()["vm_hwm_bytes"]
    start = time.perf_counter()
    data = ShardDataset.open([args.out])
    opened = time.perf_counter()
    mean, std = data.input_stats()
    stats = time.perf_counter()
    total, batch_size = 0.0, min(args.batch_size, len(data))
    for batch in epoch_batches(len(data), batch_size, epoch=0, seed=0):
        total += float(data.take(batch)[:, 0, 0, 0].float().sum())  # touch what was read
    epoch = time.perf_counter()
    read = (len(data) // batch_size) * batch_size
    return {"phase": "load", "images": len(data), "parts": len(data.shards), "open_verify_seconds": opened - start,
            "input_stats_seconds": stats - opened, "epoch_seconds": epoch - stats, "epoch_images": read,
            "images_per_s": read / (epoch - stats), "open_verify_images_per_s": len(data) / (opened - start),
            "input_mean": mean, "input_std": std, "hwm_after_imports_bytes": before, **peak_memory()}


def _phase(name: str, args: argparse.Namespace, key_path: str, out: str) -> dict:
    command = [sys.executable, "-m", "bench.scale_check", "--phase", name, "--key", key_path, "--out", out,
               "--images", str(args.images), "--size", str(args.size), "--channels", str(args.channels),
               "--patch-size", str(args.patch_size), "--batch-size", str(args.batch_size),
               "--max-shard-size", str(args.max_shard_size)] + (["--progress"] if args.progress else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env, cwd=root)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    from msd_fast import Key
    from msd_fast.client.encode import decrypt_shard
    from msd_fast.protocol.shard_sets import is_shard_set

    work = tempfile.mkdtemp(prefix="msd_fast-scale-", dir=args.work_dir)
    try:
        need = args.images * args.channels * args.size * args.size * 2
        free = shutil.disk_usage(work).free
        if need * 1.05 > free:
            raise SystemExit(f"scale_check: {args.images} images need about {need / 1e9:.1f} GB, {work} has "
                             f"{free / 1e9:.1f} GB free; lower --images")
        key = Key.generate()
        key_path = os.path.join(work, "bench.key")
        key.save(key_path)
        out = os.path.join(work, "shards")
        encode = _phase("encode", args, key_path, out)
        on_disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) if is_shard_set(out) else \
            os.path.getsize(out)
        load = _phase("load", args, key_path, out)
        ends = [0, args.images - 1]
        exact = bool(torch.equal(decrypt_shard(out, key, ends),
                                 GeneratedScans(args.images, args.size, args.channels).read(np.array(ends))))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return {"images": args.images, "geometry": [args.channels, args.size, args.size], "patch_size": args.patch_size,
            "max_shard_size": args.max_shard_size, "bytes_on_disk": on_disk, "decrypts_exactly": exact,
            "target_peak_bytes": TARGET_BYTES, "encode": encode, "load": load,
            "meets_target": max(encode["vm_hwm_bytes"], load["vm_hwm_bytes"]) <= TARGET_BYTES,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version()},
            "kept": work if args.keep else None}


def report(result: dict) -> str:
    gb = 1e9
    e, l = result["encode"], result["load"]
    return "\n".join([
        f"{result['images']} images {'x'.join(map(str, result['geometry']))}, {result['bytes_on_disk'] / gb:.2f} GB "
        f"on disk in {l['parts']} part(s) of <= {result['max_shard_size']}; decrypts exactly: "
        f"{result['decrypts_exactly']}",
        f"encode: {e['images_per_s']:.0f} images/s ({e['seconds']:.0f} s), peak RSS {e['vm_hwm_bytes'] / gb:.2f} GB "
        f"(after imports {e['hwm_after_imports_bytes'] / gb:.2f} GB)",
        f"load:   open + verify {l['open_verify_seconds']:.1f} s, input_stats {l['input_stats_seconds']:.1f} s, "
        f"epoch {l['images_per_s']:.0f} images/s, peak RSS {l['vm_hwm_bytes'] / gb:.2f} GB "
        f"(after imports {l['hwm_after_imports_bytes'] / gb:.2f} GB)",
        f"target <= {result['target_peak_bytes'] / gb:.0f} GB peak for both: "
        f"{'met' if result['meets_target'] else 'NOT met'}"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--work-dir", default=None, help="where the temporary shard set goes (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the key and shards (printed) instead of deleting")
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--progress", action="store_true", help="progress bar of the encoding")
    parser.add_argument("--phase", choices=("encode", "load"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--key", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.images < 2:
        parser.error("--images must be at least 2")
    if args.phase is not None:
        print(json.dumps((encode_phase if args.phase == "encode" else load_phase)(args)))
        return 0
    result = run(args)
    print(report(result))
    if args.json:
        from msd_fast.atomic import write_text

        write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
