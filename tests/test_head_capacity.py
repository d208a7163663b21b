"""bench.head_capacity: the batch-size search, and a smoke run of the real training step on the CPU."""
import json

import pytest

from bench.head_capacity import largest_fitting, main


@pytest.mark.parametrize("answer,limit", [(0, 10), (1, 10), (7, 64), (8, 64), (64, 64), (100, 1000), (5, 5)])
def test_search_finds_the_largest_fitting_batch_with_few_trials(answer, limit):
    trials = []

    def fits(batch):
        trials.append(batch)
        return batch <= answer

    assert largest_fitting(fits, limit) == min(answer, limit)
    assert len(trials) <= 2 * max(1, limit).bit_length() + 1
    assert all(1 <= batch <= limit for batch in trials)


def test_smoke_run_on_the_cpu_writes_both_batches(tmp_path):
    out = tmp_path / "capacity.json"
    assert main(["--device", "cpu", "--arch", "vit_tiny_patch16_224", "--image-size", "32", "--patch-size", "16",
                 "--out-dim", "64", "--max-batch", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["largest_batch_unfused"] == result["largest_batch_fused"] == 2
