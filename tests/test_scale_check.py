"""bench/scale_check.py at a tiny size: it encodes into several parts, reads them back as the server does, checks
the round trip and reports throughput and the peak memory of each phase (its own process)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scale_check_measures_both_phases_at_a_tiny_size(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, "-m", "bench.scale_check", "--images", "40", "--size", "32",
                           "--patch-size", "8", "--max-shard-size", "30kB", "--batch-size", "16",
                           "--work-dir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    encode, load = result["encode"], result["load"]
    assert result["decrypts_exactly"] and encode["images"] == load["images"] == 40
    assert load["parts"] == 3 and result["bytes_on_disk"] > 40 * 32 * 32 * 2  # float16 items plus headers
    assert load["epoch_images"] == 32 and encode["images_per_s"] > 0 and load["images_per_s"] > 0
    for phase in (encode, load):
        assert phase["vm_hwm_bytes"] >= phase["hwm_after_imports_bytes"] > 0
    assert result["meets_target"] == (max(encode["vm_hwm_bytes"], load["vm_hwm_bytes"]) <= 2 * 10**9)
    assert sorted(os.listdir(tmp_path)) == ["scale.json"]  # the shards and the key were deleted
    assert "target <= 2 GB peak for both" in done.stdout
