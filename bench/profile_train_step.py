"""What one end-to-end MS-DINO training step dispatches: ops, device kernels and host<->device syncs per step.

    python -m bench.profile_train_step [--providers reference,auto,compile,auto+compile] [--json F]

The step is ``bench_train_step``'s (``distillation_step`` at the benchmark's configuration). Per provider, after
two warm-up steps (the compiled providers compile there), one step under ``torch.profiler``:

  ops       top-level ``aten::`` calls (what the host dispatches; eager, each is one launch or more)
  kernels   device kernels, memcpys and memsets (GPU only)
  syncs     host<->device synchronisations (``torch.cuda.set_sync_debug_mode``; GPU only), with the first
            warning's source line
  wall_ms   the profiled step's wall time (profiling adds overhead; the benchmark's numbers are the timing)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.bench_train_step import PROVIDERS, make_training_step
from bench.common import DEVICE, machine_description, sync_warnings


def count_syncs(step) -> tuple:
    """``(syncs, first warning)`` of one call of ``step`` on a GPU; ``(None, None)`` on the CPU."""
    if DEVICE != "cuda":
        step()
        return None, None
    syncs = sync_warnings(step)
    return len(syncs), (f"{syncs[0].filename}:{syncs[0].lineno}" if syncs else None)


def profile_provider(provider: str) -> dict:
    backend, compiled, fused_head = PROVIDERS[provider]
    if compiled:
        torch._dynamo.reset()
    step = make_training_step(backend, compiled, fused_head)
    step(), step()
    syncs, first_sync = count_syncs(step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
    wall = time.perf_counter() - start
    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::") and e.device_type == DeviceType.CPU
              and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA) if DEVICE == "cuda" else None
    return {"provider": provider, "ops": ops, "kernels": kernels, "syncs": syncs, "first_sync": first_sync,
            "wall_ms": round(1e3 * wall, 1)}


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated (default: all four)")
    parser.add_argument("--json", help="also write the rows and the machine to this file")
    args = parser.parse_args(argv)
    rows = [profile_provider(name) for name in args.providers.split(",")]
    print(f"{'provider':14} {'ops':>6} {'kernels':>8} {'syncs':>6} {'wall ms':>9}  first sync")
    for row in rows:
        print(f"{row['provider']:14} {row['ops']:6d} {str(row['kernels']):>8} {str(row['syncs']):>6} "
              f"{row['wall_ms']:9.1f}  {row['first_sync'] or ''}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine_description(), "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
