"""Turn benchmark runs into a markdown report and a PNG.

    python -m bench.report RUN.json [MORE.json ...] [--profile P.json] [--out DIR] [--merged-json F] [--stat min]

Inputs are ``pytest bench/ --benchmark-only --benchmark-json RUN.json`` files (several are merged, e.g. the kernel
and the end-to-end runs of one machine) and optionally the JSON of ``python -m bench.profile_ops``. Writes
``DIR/report.md`` and ``DIR/report.png`` and prints the markdown. Per op and shape it shows the median (or
``--stat``) time of every provider, the speedup of each of our backends over the eager reference and over
``torch.compile`` of it, the fraction of a plain copy's bandwidth (memory-bound ops: copy time / backend time, same
bytes moved), the peak extra memory (the loss, as a multiple of the student logits) and images/s (the training
step), headed by the machine (CPU model and cores or GPU name, torch/triton versions) and the date of the run.

Records follow the schema of bench/common.py; the schema of the first GPU run (2026-11-27, before it existed) is
read too.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional

OURS = ("cuda", "triton", "cpu")  # our backends, in the order the tables list them
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "uint8": 1}


@dataclass(frozen=True)
class Record:
    """One benchmark: ``seconds`` per call (the run's chosen statistic, the median by default); the optional fields
    are set where they apply (see bench/common.py)."""

    op: str
    mode: str
    shape: str
    dtype: str
    provider: str
    device: str
    seconds: float
    bytes_moved: Optional[int] = None
    peak_extra_bytes: Optional[int] = None
    logits_bytes: Optional[int] = None
    gradient_bytes: Optional[int] = None
    items: Optional[int] = None
    resolved_backends: Optional[dict] = None
    compile_seconds: Optional[float] = None

    @property
    def group(self) -> tuple:
        return (self.op, self.mode, self.shape, self.dtype, self.device)


@dataclass
class Run:
    """Records of one or more merged runs, the machine they ran on and the groups whose reference did not compile."""

    records: list
    machine: dict
    date: str
    compile_failures: dict = field(default_factory=dict)  # group name -> error
    sources: list = field(default_factory=list)  # the raw JSON documents
    stat: str = "median"  # which of pytest-benchmark's statistics the records' times are


def _device_kind(description: str) -> str:
    return "cpu" if description in ("", "cpu") or description.startswith("cpu") else "cuda"


def _legacy_fields(bench: dict) -> Optional[dict]:
    """Fields of a record written before the common schema (first GPU run, commit 0bafb7d); None if unknown."""
    info, params, name = bench.get("extra_info", {}), bench.get("params") or {}, bench.get("name", "")
    if name.startswith("bench_patch_encryption["):
        provider = "copy" if info["provider"] == "clone" else info["provider"]
        return dict(op=info["direction"], mode="forward", shape=info["shape"], dtype=info["dtype"],
                    provider=provider, device=info.get("device", "cpu"), bytes_moved=info.get("bytes_moved"))
    if name.startswith("test_masked_gather_step["):
        copies = 2 if params["mode"] == "forward_backward" else 1
        return dict(op="masked_gather", mode=params["mode"], shape=params["shape"],
                    dtype=info["dtype"].replace("torch.", ""), provider=params["provider"],
                    device=_device_kind(info.get("device", "cpu")), bytes_moved=2 * copies * info["output_bytes"])
    if name.startswith("test_dino_loss_forward_backward["):
        dtype = info["dtype"].replace("torch.", "")
        sizes = dict(re.findall(r"(\w+)=(\d+)", info["shape"]))
        logits = int(sizes["B"]) * int(sizes["Vs"]) * int(sizes["K"]) * DTYPE_BYTES[dtype]
        return dict(op="dino_loss", mode="forward_backward", shape=info["shape"], dtype=dtype,
                    provider=info["provider"], device=_device_kind(info.get("device", "cpu")),
                    peak_extra_bytes=info.get("peak_extra_bytes"), logits_bytes=logits)
    return None


def record_from_benchmark(bench: dict, stat: str = "median") -> Optional[Record]:
    """The :class:`Record` of one pytest-benchmark entry (time: ``stats[stat]``), or None for an unknown schema."""
    info = bench.get("extra_info", {})
    if "op" in info and "mode" in info:
        fields = {name: info.get(name) for name in Record.__dataclass_fields__ if name != "seconds"}
    else:
        fields = _legacy_fields(bench)
        if fields is None:
            return None
    return Record(seconds=bench["stats"][stat], **fields)


def _legacy_machine(document: dict) -> dict:
    """What a JSON without ``machine_info["msd_fast"]`` says about its machine."""
    info = document.get("machine_info", {})
    cpu = info.get("cpu", {})
    first = next((b.get("extra_info", {}) for b in document.get("benchmarks", [])), {})
    device_names = {b.get("extra_info", {}).get("device", "") for b in document.get("benchmarks", [])}
    gpus = sorted(name for name in device_names if _device_kind(name) == "cuda" and name != "cuda")
    machine = {"cpu_model": cpu.get("brand_raw", info.get("processor", "?")), "cpu_cores": cpu.get("count"),
               "torch": first.get("torch", "not recorded"), "triton": "not recorded"}
    if gpus:
        machine.update(device="cuda", gpu=gpus[0])
    else:
        machine["device"] = "cpu"
    return machine


def load_runs(paths: Iterable[str], stat: str = "median") -> Run:
    """Read and merge pytest-benchmark JSON files (the machine and date are the first readable file's); unreadable
    or empty files (a run cut short) are skipped with a message."""
    records, failures, sources = [], {}, []
    machine, date = None, ""
    for path in paths:
        try:
            with open(path) as handle:
                document = json.load(handle)
        except (OSError, ValueError) as error:  # e.g. the empty file of a run cut short by a timeout
            print(f"skipping {path}: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        sources.append(document)
        records += [r for r in (record_from_benchmark(b, stat) for b in document.get("benchmarks", [])) if r]
        for failure in document.get("msd_fast", {}).get("compile_failures", []):
            failures[failure["group"]] = failure["error"]
        if machine is None:
            machine = document.get("machine_info", {}).get("msd_fast") or _legacy_machine(document)
            date = document.get("datetime", "")[:10]
    return Run(records, machine or {}, date, failures, sources, stat)


def merged_document(run: Run) -> dict:
    """One pytest-benchmark-style JSON document holding every benchmark of ``run`` (re-readable by this module)."""
    first = run.sources[0] if run.sources else {}
    return {**first, "benchmarks": [b for doc in run.sources for b in doc.get("benchmarks", [])],
            "msd_fast": {"compile_failures": [{"group": g, "error": e} for g, e in run.compile_failures.items()]}}


# ---- formatting ---------------------------------------------------------------------------------------------------
def format_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "--"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def format_ratio(value: Optional[float]) -> str:
    return "--" if value is None else f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def format_fraction(value: Optional[float]) -> str:
    return "--" if value is None else f"{100 * value:.0f} %"


def machine_line(run: Run) -> str:
    m = run.machine
    cores = f"{m.get('cpu_cores')}-core " if m.get("cpu_cores") else ""
    host = f"{cores}{m.get('cpu_model', '?')}"
    if m.get("torch_threads"):
        host += f" ({m['torch_threads']} torch threads)"
    where = f"{m['gpu']} on a {host}" if m.get("gpu") else host
    versions = [f"torch {m.get('torch', '?')}", f"triton {m.get('triton') or 'not installed'}"]
    if m.get("cuda"):
        versions.append(f"CUDA {m['cuda']}")
    return f"**Machine**: {where}; {', '.join(versions)}. **Run**: {run.date or 'date not recorded'}."


def _by_group(records: list) -> dict:
    groups: dict = {}
    for record in records:
        groups.setdefault(record.group, {})[record.provider] = record
    return groups


def _speedup(base: Optional[Record], ours: Record) -> Optional[float]:
    return base.seconds / ours.seconds if base is not None else None


def _compile_cell(run: Run, group: tuple, providers: dict) -> str:
    if "compile" in providers:
        return format_time(providers["compile"].seconds)
    op, mode, shape, dtype, device = group
    name = f"{op} {mode} {shape} {dtype} on {device}"
    return "does not compile" if name in run.compile_failures else "not run"


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def memory_bound_table(run: Run) -> list:
    """Rows per (op, mode, shape, dtype, our backend) of the groups that have a ``copy`` provider."""
    rows = []
    for group, providers in sorted(_by_group(run.records).items()):
        if "copy" not in providers:
            continue
        reference, compiled, copy = providers.get("reference"), providers.get("compile"), providers["copy"]
        for name in OURS:
            if name not in providers:
                continue
            ours = providers[name]
            op, mode, shape, dtype, _ = group
            rows.append([f"{op} {mode.replace('_', '+')}", shape, dtype, f"`{name}`", format_time(ours.seconds),
                         format_time(reference.seconds if reference else None), format_ratio(_speedup(reference, ours)),
                         _compile_cell(run, group, providers), format_ratio(_speedup(compiled, ours)),
                         format_time(copy.seconds), format_fraction(copy.seconds / ours.seconds)])
    return _table(["op", "shape", "dtype", "backend", run.stat, "eager reference", "speedup", "torch.compile",
                   "vs compile", "copy of same bytes", "fraction of copy bandwidth"], rows)


def scaling_table(run: Run) -> list:
    """Two-point fit ``time = fixed + marginal * copy time`` over the two shapes of each (op, mode, dtype, backend) of
    the memory-bound groups whose copies differ at least 2x: the per-call cost that does not grow with the data
    (launches, host work, latency chains) and the kernels' bandwidth on additional bytes, as a fraction of the
    copy's."""
    series: dict = {}
    for group, providers in sorted(_by_group(run.records).items()):
        if "copy" not in providers:
            continue
        op, mode, shape, dtype, _ = group
        for name in OURS:
            if name in providers:
                series.setdefault((op, mode, dtype, name), []).append(
                    (shape, providers[name].seconds, providers["copy"].seconds))
    rows = []
    for (op, mode, dtype, name), points in series.items():
        if len(points) != 2:
            continue
        (shape1, t1, c1), (shape2, t2, c2) = sorted(points, key=lambda point: point[2])
        if c2 < 2 * c1:  # the shapes' copies differ too little for a fit to say anything
            continue
        slope = (t2 - t1) / (c2 - c1)
        fixed = t1 - slope * c1
        rows.append([f"{op} {mode.replace('_', '+')}", dtype, f"`{name}`", f"{shape1} -> {shape2}",
                     f"{format_time(t1)} -> {format_time(t2)}", f"{format_time(c1)} -> {format_time(c2)}",
                     format_time(fixed) if fixed > 0 else "n/a (noise)",
                     format_fraction(1 / slope) if slope > 0 else "n/a (noise)"])
    return _table(["op", "dtype", "backend", "shapes", run.stat, "copy", "fixed cost per step",
                   "marginal fraction of copy bandwidth"], rows)


def _memory_cell(record: Optional[Record]) -> str:
    if record is None or record.peak_extra_bytes is None or not record.logits_bytes:
        return "--"
    ratio = record.peak_extra_bytes / record.logits_bytes
    return "< 0.1x" if ratio < 0.05 else f"{ratio:.1f}x"


def loss_table(run: Run) -> list:
    rows = []
    for group, providers in sorted(_by_group(run.records).items()):
        if group[0] != "dino_loss":
            continue
        reference, compiled = providers.get("reference"), providers.get("compile")
        for name in OURS:
            if name not in providers:
                continue
            ours = providers[name]
            rows.append([group[2], group[3], f"`{name}`", format_time(ours.seconds),
                         format_time(reference.seconds if reference else None), format_ratio(_speedup(reference, ours)),
                         _compile_cell(run, group, providers), format_ratio(_speedup(compiled, ours)),
                         _memory_cell(ours), _memory_cell(reference), _memory_cell(compiled)])
    return _table(["shape", "dtype", "backend", f"{run.stat} fwd+bwd", "eager reference", "speedup", "torch.compile",
                   "vs compile", "peak extra memory (x student logits)", "eager", "torch.compile"], rows)


def head_loss_table(run: Run) -> list:
    """Rows of the fused head + loss benchmark: each provider's time against the unfused path on the same backend,
    and its peak memory beyond the two gradients it returns, as a multiple of the unfused float32 logits."""
    rows = []
    for group, providers in sorted(_by_group(run.records).items()):
        if group[0] != "dino_head_loss":
            continue
        for name, record in sorted(providers.items()):
            kind, _, backend = name.partition("-")
            unfused = providers.get(f"unfused-{backend}") if kind == "fused" else None
            beyond = (None if record.peak_extra_bytes is None or not record.logits_bytes else
                      max(record.peak_extra_bytes - (record.gradient_bytes or 0), 0) / record.logits_bytes)
            rows.append([group[2], group[3], f"`{name}`", format_time(record.seconds),
                         format_ratio(_speedup(unfused, record)) if unfused else "--",
                         "--" if beyond is None else f"{beyond:.2f}x"])
    return _table(["shape", "dtype", "provider", f"{run.stat} fwd+bwd", "speedup vs unfused",
                   "peak beyond the gradients (x float32 logits)"], rows)


# bench_train_step's providers, in the table's order
TRAIN_PROVIDERS = ("reference", "compile", "auto", "auto+compile", "auto+fused-head")


def train_step_table(run: Run) -> list:
    """Rows per training-step provider: time, images/s, speedup over the eager reference and over the reference
    under ``--compile`` (provider ``compile``), and the compiled providers' warm-up (compile) time."""
    rows = []
    for group, providers in sorted(_by_group(run.records).items()):
        if group[0] != "train_step":
            continue
        reference, compiled = providers.get("reference"), providers.get("compile")
        order = sorted(providers, key=lambda p: (TRAIN_PROVIDERS.index(p) if p in TRAIN_PROVIDERS else 99, p))
        for name in order:
            record = providers[name]
            resolved = ", ".join(f"{op}: {backend}" for op, backend in (record.resolved_backends or {}).items())
            rows.append([group[2], group[3], f"`{name}`" + (f" ({resolved})" if resolved else ""),
                         format_time(record.seconds), f"{(record.items or 0) / record.seconds:.1f}",
                         format_ratio(_speedup(reference, record)), format_ratio(_speedup(compiled, record)),
                         "--" if record.compile_seconds is None else f"{record.compile_seconds:.0f} s"])
    return _table(["model, batch, views", "precision", "ops", f"{run.stat} step", "images/s", "vs reference",
                   "vs compile", "compile time"], rows)


def profile_table(profile: dict) -> list:
    """Rows of a ``bench.profile_ops`` JSON: wall time vs device-kernel time per call, and the host's share."""
    rows = []
    for row in profile.get("rows", []):
        device_us = row.get("device_us")
        rows.append([f"{row['op']} {row['mode'].replace('_', '+')}", row["shape"], row["dtype"], f"`{row['provider']}`",
                     f"{row['wall_sync_us']:.0f}", f"{row['wall_async_us']:.0f}",
                     "--" if device_us is None else f"{device_us:.0f}",
                     "--" if row.get("kernels_per_call") is None else f"{row['kernels_per_call']:.1f}",
                     "--" if row.get("syncs_per_call") is None else f"{row['syncs_per_call']:.1f}",
                     format_fraction(row.get("kernel_copy_fraction")),
                     "--" if row.get("tiny_wall_async_us") is None else f"{row['tiny_wall_async_us']:.0f}"])
    return _table(["op", "shape", "dtype", "provider", "wall us/call (synced)", "wall us/call (back-to-back)",
                   "device kernel us/call", "kernels/call", "host syncs/call", "kernel-only fraction of copy bw",
                   "host us/call at a tiny shape"], rows)


def top_kernels(profile: dict) -> list:
    """One line per profiled row of our backends: its longest device kernels (us per call, launches per call)."""
    lines = []
    for row in profile.get("rows", []):
        if row["provider"] in OURS and row.get("top_kernels"):
            kernels = "; ".join(f"`{name}` {us:.0f} us x{count:g}" for name, us, count in row["top_kernels"][:4])
            lines.append(f"- {row['op']} {row['mode'].replace('_', '+')} {row['shape']} {row['dtype']} "
                         f"`{row['provider']}`: {kernels}")
    return (["Longest device kernels per call:", ""] + lines + [""]) if lines else []


def markdown(run: Run, profile: Optional[dict] = None) -> str:
    lines = ["# msd_fast benchmark report", "", machine_line(run), ""]
    sections = [
        ("Memory-bound kernels (encryption, masked gather)",
         f"Time per call ({run.stat} of the rounds) of our backend, the eager PyTorch reference, `torch.compile` of "
         "the reference and a plain copy of the same bytes; fraction of copy bandwidth = copy time / backend time.",
         memory_bound_table(run)),
        ("How the time scales with the data",
         "A fixed cost that does not grow with the bytes moved (host work, launches, syncs, serial latency) vs the "
         "kernels' bandwidth on the extra bytes of the larger shape: a two-point fit per op, dtype and backend; "
         "noisy when the two times are close.", scaling_table(run)),
        ("DINO loss (forward + backward)",
         "Peak extra memory: one step's peak allocation beyond the inputs, as a multiple of the student logits "
         "(the returned gradient alone is 1.0x).", loss_table(run)),
        ("DINO head last layer + loss, fused (forward + backward)",
         "`fused-*`: `dino_head_loss` (per chunk of samples: the last layer's GEMM, our loss kernel, the gradients); "
         "`unfused-*`: `F.linear` to the whole logits, then `dino_loss`. Target: time <= unfused, peak memory beyond "
         "the returned gradients <= 0.25x the unfused float32 logits.", head_loss_table(run)),
        ("End-to-end MS-DINO training step", "Images/s of one step; `auto` uses our kernels, `reference` forces "
         "every op to the eager reference; `compile` and `auto+compile` are the same under the trainer's "
         "`--compile` (compile time: the warm-up step).", train_step_table(run)),
    ]
    for title, note, table in sections:
        if len(table) > 2:
            lines += [f"## {title}", "", note, ""] + table + [""]
    if profile is not None:
        lines += ["## Kernel time vs host overhead (torch.profiler)", "",
                  "Wall time per call with a synchronisation after each call, back-to-back (one synchronisation "
                  "after all calls: the host's cost when it cannot hide behind the device), the device kernels' own "
                  "time per call, and the wall time per call at a tiny shape (pure per-call host overhead).", ""]
        lines += profile_table(profile) + [""] + top_kernels(profile)
    if run.compile_failures:
        lines += ["## References that do not compile", ""]
        lines += [f"- {group}: {error}" for group, error in sorted(run.compile_failures.items())] + [""]
    return "\n".join(lines)


# ---- figure -------------------------------------------------------------------------------------------------------
def _short(group: tuple) -> str:
    op, mode, shape, dtype, _ = group
    return f"{op}{' fwd+bwd' if mode == 'forward_backward' else ''} {shape} {dtype}"


def plot(run: Run, path: str) -> None:
    """Two panels: speedup of every non-reference provider over the eager reference (log scale), and the fraction
    of copy bandwidth of the memory-bound groups."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    groups = _by_group(run.records)
    providers = [p for p in ("compile",) + OURS if any(p in g for g in groups.values())]
    colors = dict(zip(("compile",) + OURS, ("tab:gray", "tab:green", "tab:blue", "tab:orange")))
    speed_groups = [g for g in sorted(groups) if "reference" in groups[g]]
    bw_groups = [g for g in sorted(groups) if "copy" in groups[g]]
    height = max(3.0, 0.32 * max(len(speed_groups), len(bw_groups), 1) * max(1, len(providers)) / 2 + 1.5)
    figure, axes = plt.subplots(1, 2, figsize=(15, height))
    bar = 0.8 / max(1, len(providers))
    for axis, selected, value, title in (
            (axes[0], speed_groups, lambda g, p: groups[g]["reference"].seconds / groups[g][p].seconds,
             "speedup over the eager reference (log scale)"),
            (axes[1], bw_groups, lambda g, p: groups[g]["copy"].seconds / groups[g][p].seconds,
             "fraction of a plain copy's bandwidth")):
        for index, provider in enumerate(providers):
            ys = [i + index * bar for i, g in enumerate(selected) if provider in groups[g]]
            xs = [value(g, provider) for g in selected if provider in groups[g]]
            axis.barh(ys, xs, height=bar, color=colors[provider], label=provider)
        axis.set_yticks([i + bar * (len(providers) - 1) / 2 for i in range(len(selected))])
        axis.set_yticklabels([_short(g) for g in selected], fontsize=7)
        axis.invert_yaxis()
        axis.set_title(title, fontsize=9)
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].xaxis.set_major_locator(ticker.LogLocator(base=2))
    axes[0].xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    axes[0].xaxis.set_minor_formatter(ticker.NullFormatter())
    axes[1].xaxis.set_major_formatter(ticker.PercentFormatter(1.0))
    axes[0].axvline(1.0, color="black", linewidth=0.8)
    axes[1].axvline(1.0, color="black", linewidth=0.8)
    if providers:  # a run of, e.g., only the fused head + loss has none of these bars
        axes[0].legend(fontsize=7, loc="lower right")
    figure.suptitle(machine_line(run).replace("**", ""), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="pytest-benchmark JSON files (--benchmark-json) of one machine")
    parser.add_argument("--profile", help="JSON written by python -m bench.profile_ops")
    parser.add_argument("--out", default="reports", help="folder for report.md and report.png (default: reports)")
    parser.add_argument("--merged-json", help="also write all runs merged into this one JSON file")
    parser.add_argument("--no-png", action="store_true", help="skip the figure")
    parser.add_argument("--stat", default="median", choices=("median", "min", "mean"),
                        help="which statistic of the rounds to report (default median; min resists a shared machine's "
                             "interference, which only ever adds time)")
    args = parser.parse_args(argv)
    run = load_runs(args.runs, args.stat)
    if not run.records:
        print(f"no benchmark records in {', '.join(args.runs)}", file=sys.stderr)
        return 1
    profile = None
    if args.profile and os.path.exists(args.profile):
        with open(args.profile) as handle:
            profile = json.load(handle)
    os.makedirs(args.out, exist_ok=True)
    text = markdown(run, profile)
    with open(os.path.join(args.out, "report.md"), "w") as handle:
        handle.write(text)
    if not args.no_png:
        plot(run, os.path.join(args.out, "report.png"))
    if args.merged_json:
        with open(args.merged_json, "w") as handle:
            json.dump(merged_document(run), handle)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
