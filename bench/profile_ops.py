"""Where a call's time goes: wall time per call vs the device kernels' own time, per op, shape, dtype and backend.

    python -m bench.profile_ops [--json profile.json] [--calls 20] [--ops encrypt,masked_gather,dino_loss]

It answers two questions the benchmarks cannot: how close the kernels *alone* come to a plain copy's bandwidth,
and how much of a call is host overhead (argument checks, custom-op dispatch, allocation, host<->device syncs).
The steps are the benchmarks' own (each bench module's ``make_step``), at the benchmark shapes and at a tiny shape;
encryption also with block scrambling alone ("blocks only": whole block rows are copied, so reads coalesce), which
tells the cost of pixel shuffling's scattered reads.
Per row of the JSON (``rows``) and of the printed table:

  wall_sync_us      median over calls of one call + a device synchronisation (what pytest-benchmark times)
  wall_async_us     ``calls`` calls back to back and one synchronisation, divided by ``calls`` (best of 3): the
                    larger of the host's and the device's cost per call (the host's when the device waits for it)
  device_us         GPU: the device's kernel, memcpy and memset time per call (torch.profiler); None on CPU
  kernels_per_call  device kernels (and copies) launched per call; ``top_kernels``: [name, us per call, count]
  syncs_per_call    host<->device synchronisations per call (``torch.cuda.set_sync_debug_mode``), GPU only
  kernel_copy_fraction   ``copy``'s device_us / this row's device_us (same bytes): the kernels' own bandwidth
                    fraction (on CPU the wall-time ratio)
  tiny_wall_sync_us, tiny_wall_async_us   the same call on a tiny input: the per-call floor, i.e. host overhead
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from bench import bench_dino_loss, bench_masked_gather, bench_patch_encryption
from bench.common import DEVICE, dtype_name, kernel_backends, machine_description, sync_warnings, synchronize
from bench.report import profile_table

TINY = {"encrypt": (1, 1, 16, 16), "masked_gather": (1, 4, 8), "dino_loss": (1, 8)}  # dino_loss: (B, K)


def cases(ops: list) -> list:
    """(op, mode, shape label, dtype, provider, make(tiny) -> (step, bytes_moved or None))."""
    providers = kernel_backends() + ["reference"]
    found = []
    if "encrypt" in ops:  # all three transforms, and block scrambling alone (coalesced reads within a block row)
        blocks_only = dict(block_scramble=True, pixel_shuffle=False, negpos=False)
        for label, shape in bench_patch_encryption.SHAPES.items():
            for name, dtype in bench_patch_encryption.DTYPES.items():
                for variant, options, variant_providers in (("", bench_patch_encryption.OPTIONS, providers + ["copy"]),
                                                            (" blocks only", blocks_only, kernel_backends())):
                    for provider in variant_providers:
                        def make(tiny, shape=shape, dtype=dtype, provider=provider, options=options):
                            return bench_patch_encryption.make_step(TINY["encrypt"] if tiny else shape, dtype,
                                                                    "encrypt", provider, options=options)
                        found.append(("encrypt", "forward", label + variant, name, provider, make))
    if "masked_gather" in ops:
        for label in bench_masked_gather.shape_ids():
            for dtype in bench_masked_gather.DTYPES:
                for mode in bench_masked_gather.MODES:
                    for provider in providers + ["copy"]:
                        def make(tiny, label=label, dtype=dtype, mode=mode, provider=provider):
                            shape = TINY["masked_gather"] if tiny else bench_masked_gather.SHAPES[label]
                            return bench_masked_gather.make_step(shape, dtype, mode, provider)
                        found.append(("masked_gather", mode, label, dtype_name(dtype), provider, make))
    if "dino_loss" in ops:
        for out_dim in (65536, 4096):
            for dtype in bench_dino_loss.dtypes():
                for provider in providers:
                    def make(tiny, out_dim=out_dim, dtype=dtype, provider=provider):
                        batch, k = TINY["dino_loss"] if tiny else (bench_dino_loss.BATCH, out_dim)
                        step, _ = bench_dino_loss.make_step(batch, k, dtype, provider)
                        return step, None
                    found.append(("dino_loss", "forward_backward", bench_dino_loss.shape_label(
                        bench_dino_loss.BATCH, out_dim), dtype_name(dtype), provider, make))
    return found


def wall_times(step: Callable, calls: int, batches: int = 3) -> tuple:
    """(median us of one synchronised call, us per call of ``calls`` back-to-back calls: the best of ``batches``)."""
    synced = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        synchronize()
        synced.append(time.perf_counter() - start)
    back_to_back = []
    for _ in range(batches):
        synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            step()
        synchronize()
        back_to_back.append((time.perf_counter() - start) / calls)
    return 1e6 * statistics.median(synced), 1e6 * min(back_to_back)


def device_profile(step: Callable, calls: int) -> dict:
    """GPU: device time, kernel count and top kernels per call (torch.profiler), and syncs per call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        total = getattr(event, "self_device_time_total", None)
        if total is None:
            total = getattr(event, "self_cuda_time_total", 0.0)
        kernels.append([event.key[:90], total / calls, event.count / calls])
    kernels.sort(key=lambda kernel: -kernel[1])
    syncs = len(sync_warnings(step))
    return {"device_us": sum(k[1] for k in kernels), "kernels_per_call": sum(k[2] for k in kernels),
            "top_kernels": [[name, round(us, 2), round(count, 2)] for name, us, count in kernels[:6]],
            "syncs_per_call": float(syncs)}


def profile_case(make: Callable, calls: int) -> dict:
    step, bytes_moved = make(False)
    row = {"bytes_moved": bytes_moved}
    row["wall_sync_us"], row["wall_async_us"] = wall_times(step, calls)
    row.update(device_us=None, kernels_per_call=None, top_kernels=[], syncs_per_call=None)
    if DEVICE == "cuda":
        try:
            row.update(device_profile(step, calls))
        except Exception as error:  # a profiler problem must not lose the wall times
            row["profile_error"] = f"{type(error).__name__}: {error}"[:200]
    del step
    tiny_step, _ = make(True)
    row["tiny_wall_sync_us"], row["tiny_wall_async_us"] = wall_times(tiny_step, 4 * calls)
    return row


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--calls", type=int, default=20, help="calls per measurement (default 20)")
    parser.add_argument("--ops", default="encrypt,masked_gather,dino_loss", help="comma-separated ops to profile")
    args = parser.parse_args(argv)
    result = {"machine": machine_description(), "date": datetime.date.today().isoformat(), "calls": args.calls,
              "rows": []}
    for op, mode, shape, dtype, provider, make in cases(args.ops.split(",")):
        try:
            row = profile_case(make, args.calls)
        except Exception as error:  # report and go on: one failing case must not hide the others
            print(f"{op} {mode} {shape} {dtype} {provider}: failed: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        result["rows"].append(dict(op=op, mode=mode, shape=shape, dtype=dtype, provider=provider, device=DEVICE,
                                   **row))
        print(f"{op} {mode} {shape} {dtype} {provider}: {row['wall_sync_us']:.0f} us synced, "
              f"{row['wall_async_us']:.0f} us back-to-back, device {row['device_us']}", flush=True)
        add_copy_fractions(result["rows"])
        if args.json:  # after every row, so that a run cut short by a timeout still leaves its rows
            with open(args.json, "w") as handle:
                json.dump(result, handle, indent=1)
    print("\n".join(profile_table(result)))
    return 0


def add_copy_fractions(rows: list) -> None:
    """``kernel_copy_fraction`` of every row with a ``copy`` row of the same op, mode, shape and dtype."""
    copies = {(r["op"], r["mode"], r["shape"], r["dtype"]): r for r in rows if r["provider"] == "copy"}
    key = "device_us" if DEVICE == "cuda" else "wall_sync_us"
    for row in rows:
        copy = copies.get((row["op"], row["mode"], row["shape"], row["dtype"]))
        if copy is not None and copy.get(key) and row.get(key):
            row["kernel_copy_fraction"] = copy[key] / row[key]


if __name__ == "__main__":
    sys.exit(main())
