"""One training step on a GPU never waits for the device: drawing and copying the views, the student and teacher
forwards (masked_gather's range check skipped, the head's BatchNorm counting rows on the device), the loss,
backward, clipping, AdamW and the EMA run under ``torch.cuda.set_sync_debug_mode("error")``, and the step returns its
loss unread (the trainer reads the losses every ``log_every`` steps, :func:`read_losses`). The compiled step's range
check is covered on the CPU, in test_compile_pretraining.py."""
import pytest
import torch

from msd_fast.server.model import GlobalBatchNorm1d
from msd_fast.server.trainer import Pretraining

from test_pretrain import structured_images, tiny_config, write_client_shard


@pytest.mark.gpu
def test_a_step_has_no_sync_but_the_loss_value(tmp_path):
    shard = [write_client_shard(tmp_path / "client.shard", structured_images(32, seed=0))]
    run = Pretraining(tiny_config(shard, tmp_path / "out", device="cuda"))
    inputs = run.data.take(torch.arange(16)).cuda()
    run.train_step(inputs, epoch=0, step=0)  # warm-up: cuBLAS handles, allocator, compiled graphs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = run.train_step(inputs, epoch=0, step=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_global_batch_norm_counts_on_the_device_and_matches_batch_norm():
    """Its row count is made on the device (no host copy); one process: torch's BatchNorm1d, statistics included."""
    torch.manual_seed(0)
    x = torch.randn(12, 5) * 3 + 1
    mine, theirs = GlobalBatchNorm1d(5), torch.nn.BatchNorm1d(5)
    torch.testing.assert_close(mine(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(mine.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)
