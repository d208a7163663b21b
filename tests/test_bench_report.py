"""bench.report on a small synthetic pytest-benchmark run: the tables' numbers, compile failures, the schema of the
first GPU run, the merged JSON and the figure."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not installed; it runs from the repository root
    sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402


def _bench(median, **info):
    return {"name": f"bench_x[{info.get('provider')}]", "params": {}, "extra_info": info,
            "stats": {"median": median, "mean": median}}


def _encrypt(provider, median, dtype="uint8"):
    return _bench(median, op="encrypt", mode="forward", shape="64x3x224x224", dtype=dtype, provider=provider,
                  device="cpu", bytes_moved=2 * 64 * 3 * 224 * 224)


def _loss(provider, median, peak):
    return _bench(median, op="dino_loss", mode="forward_backward", shape="B=64 Vt=2 Vs=10 K=4096", dtype="float32",
                  provider=provider, device="cpu", peak_extra_bytes=peak, logits_bytes=1000)


def _train(provider, median):
    return _bench(median, op="train_step", mode="forward_backward", shape="vit_tiny B=64", dtype="float32",
                  provider=provider, device="cpu", items=64,
                  resolved_backends={"masked_gather": "cpu" if provider == "auto" else "reference"})


def _legacy_gather(provider, median):
    """A record as the first GPU run (2026-11-27) wrote it, before the common schema."""
    return {"name": f"test_masked_gather_step[vit_s16-float32-forward-{provider}]",
            "params": {"shape": "vit_s16", "mode": "forward", "provider": provider},
            "extra_info": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "dtype": "torch.float32",
                           "output_bytes": 1000},
            "stats": {"median": median}}


def _write_run(tmp_path):
    run = {"datetime": "2026-11-27T10:00:00", "machine_info": {"msd_fast": {
               "device": "cpu", "cpu_model": "AMD EPYC", "cpu_cores": 2, "torch_threads": 2, "torch": "2.14.1",
               "triton": "3.8.0", "cuda": None}},
           "msd_fast": {"compile_failures": [{"group": "encrypt forward 64x3x224x224 float32 on cpu",
                                              "error": "BackendCompilerFailed: boom"}]},
           "benchmarks": [_encrypt("cpu", 0.004), _encrypt("reference", 0.040), _encrypt("compile", 0.008),
                          _encrypt("copy", 0.001), _encrypt("cpu", 0.010, "float32"),
                          _encrypt("reference", 0.020, "float32"), _encrypt("copy", 0.005, "float32"),
                          _loss("cpu", 0.010, 1000), _loss("reference", 0.030, 3000), _train("auto", 0.5),
                          _train("reference", 1.0)]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    legacy = {"machine_info": {"cpu": {"brand_raw": "Intel Xeon", "count": 16}}, "datetime": "2026-11-27",
              "benchmarks": [_legacy_gather("cuda", 2e-4), _legacy_gather("reference", 4e-4),
                             _legacy_gather("copy", 5e-5)]}
    legacy_path = tmp_path / "legacy.json"
    legacy_path.write_text(json.dumps(legacy))
    return path, legacy_path


def _row(text, *cells):
    return [line for line in text.splitlines() if all(f"| {cell} |" in line for cell in cells)]


def test_report_tables_from_a_synthetic_run(tmp_path):
    path, _ = _write_run(tmp_path)
    assert report.main([str(path), "--out", str(tmp_path / "out"), "--merged-json", str(tmp_path / "all.json")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "2-core AMD EPYC (2 torch threads); torch 2.14.1, triton 3.8.0" in text and "2026-11-27" in text
    # uint8: 40 ms eager / 4 ms ours = 10x; compile 8 ms -> 2x; copy 1 ms / 4 ms = 25 % of copy bandwidth.
    (uint8,) = _row(text, "uint8", "`cpu`")
    assert "| 4 ms | 40 ms | 10.0x | 8 ms | 2.00x | 1 ms | 25 % |" in uint8
    (float32,) = _row(text, "64x3x224x224", "float32", "`cpu`")
    assert "| does not compile |" in float32 and "| 2.00x |" in float32 and "| 50 % |" in float32
    (loss,) = _row(text, "B=64 Vt=2 Vs=10 K=4096")
    assert "| 3.00x |" in loss and "| 1.0x | 3.0x |" in loss
    (auto,) = _row(text, "vit_tiny B=64", "500 ms")
    assert "| 128.0 | 2.00x |" in auto and "masked_gather: cpu" in auto
    assert "BackendCompilerFailed: boom" in text
    assert (tmp_path / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"
    merged = report.load_runs([str(tmp_path / "all.json")])
    assert len(merged.records) == 11 and merged.compile_failures


def test_report_reads_the_first_gpu_runs_schema(tmp_path):
    path, legacy_path = _write_run(tmp_path)
    run = report.load_runs([str(legacy_path)])
    assert run.machine["gpu"] == "NVIDIA H100 80GB HBM3" and run.machine["torch"] == "2.11.0"
    copy = [r for r in run.records if r.provider == "copy"][0]
    assert copy.device == "cuda" and copy.op == "masked_gather" and copy.bytes_moved == 2000
    text = report.markdown(run)
    (row,) = _row(text, "vit_s16", "`cuda`")
    assert "| 200 us | 400 us | 2.00x | not run | -- | 50 us | 25 % |" in row
    both = report.load_runs([str(path), str(legacy_path)])
    assert len(both.records) == 14 and both.machine["cpu_model"] == "AMD EPYC"


def test_scaling_fit_separates_fixed_cost_from_bandwidth():
    def gather(shape, provider, seconds):
        return report.Record("masked_gather", "forward", shape, "float32", provider, "cuda", seconds)
    records = [gather("small", "cuda", 200e-6), gather("small", "copy", 50e-6),
               gather("large", "cuda", 800e-6), gather("large", "copy", 350e-6)]
    text = report.markdown(report.Run(records, {"gpu": "H100"}, "2026-11-27"))
    (row,) = _row(text, "small -> large")
    # 600 us more for 300 us more copy: half the copy's bandwidth on extra bytes, 100 us per step that never scales.
    assert "| 100 us | 50 % |" in row


def test_profile_section_lists_device_time_syncs_and_kernels(tmp_path):
    path, _ = _write_run(tmp_path)
    profile = {"rows": [{"op": "masked_gather", "mode": "forward_backward", "shape": "vit_s16", "dtype": "float32",
                         "provider": "cuda", "wall_sync_us": 1280.0, "wall_async_us": 1100.0, "device_us": 900.0,
                         "kernels_per_call": 12.0, "syncs_per_call": 2.0, "kernel_copy_fraction": 0.1,
                         "tiny_wall_async_us": 150.0, "top_kernels": [["masked_gather_backward_kernel", 600.0, 2.0]]}]}
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    report.main([str(path), "--profile", str(tmp_path / "profile.json"), "--out", str(tmp_path), "--no-png"])
    text = (tmp_path / "report.md").read_text()
    (row,) = _row(text, "masked_gather forward+backward", "vit_s16", "`cuda`")
    assert "| 1280 | 1100 | 900 | 12.0 | 2.0 | 10 % | 150 |" in row
    assert "`masked_gather_backward_kernel` 600 us x2" in text


def test_a_run_cut_short_is_skipped(tmp_path):
    path, _ = _write_run(tmp_path)
    (tmp_path / "empty.json").write_text("")  # pytest-benchmark creates the file before the run ends
    run = report.load_runs([str(tmp_path / "empty.json"), str(path), str(tmp_path / "missing.json")])
    assert len(run.records) == 11 and run.machine["cpu_model"] == "AMD EPYC"


def test_head_loss_section_compares_fused_with_unfused_on_the_same_backend(tmp_path):
    def head(provider, median, peak):
        return _bench(median, op="dino_head_loss", mode="forward_backward", shape="B=64 Vt=2 Vs=12 D=256 K=65536",
                      dtype="bfloat16", provider=provider, device="cuda", peak_extra_bytes=peak, gradient_bytes=100,
                      logits_bytes=1000)

    run = {"datetime": "2026-12-04T10:00:00", "machine_info": {"msd_fast": {"device": "cuda", "gpu": "H200"}},
           "benchmarks": [head("fused-cuda", 0.002, 300), head("unfused-cuda", 0.004, 2100),
                          head("unfused-triton", 0.003, 2100)]}
    path = tmp_path / "head.json"
    path.write_text(json.dumps(run))
    assert report.main([str(path), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    (fused,) = _row(text, "`fused-cuda`")
    assert "| 2 ms | 2.00x | 0.20x |" in fused  # 4 ms / 2 ms; (300 - 100) / 1000
    (unfused,) = _row(text, "`unfused-triton`")
    assert "| -- | 2.00x |" in unfused


def test_train_step_table_compares_every_provider_with_both_references(tmp_path):
    runs = {"datetime": "2026-12-04", "benchmarks": [
        _train("auto+compile", 0.4), _train("auto", 0.5), _train("compile", 0.8), _train("reference", 1.0)]}
    for bench in runs["benchmarks"]:
        if "compile" in bench["extra_info"]["provider"]:
            bench["extra_info"]["compile_seconds"] = 42.0
    (tmp_path / "train.json").write_text(json.dumps(runs))
    text = report.markdown(report.load_runs([str(tmp_path / "train.json")]))
    rows = [line for line in text.splitlines() if "| vit_tiny B=64 |" in line]
    assert [row.split(" | ")[2].split(" ")[0] for row in rows] == ["`reference`", "`compile`", "`auto`",
                                                                    "`auto+compile`"]
    # 64 images in 0.4 s; 1.0 s / 0.4 s over the eager reference, 0.8 s / 0.4 s over the compiled one
    assert "| 400 ms | 160.0 | 2.50x | 2.00x | 42 s |" in rows[3]
    assert "| 1 s | 64.0 | 1.00x | 0.80x | -- |" in rows[0]
