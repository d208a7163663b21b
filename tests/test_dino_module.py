"""DINOLoss: teacher-temperature schedule, loss at the scheduled temperature, center EMA (also across two gloo
processes)."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msd_fast import DINOLoss, dino_loss
from msd_fast.dino import teacher_temp_schedule


def test_schedule_warms_up_linearly_then_stays():
    schedule = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert schedule.shape == (100,)
    np.testing.assert_allclose(schedule[:30], np.linspace(0.04, 0.07, 30))
    assert schedule[0] == 0.04 and np.all(schedule[29:] == 0.07)
    np.testing.assert_array_equal(teacher_temp_schedule(0.04, 0.07, 0, 5), np.full(5, 0.07))
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        teacher_temp_schedule(0.04, 0.07, 6, 5)


@pytest.mark.parametrize("epoch", [0, 3, 9])
def test_forward_uses_scheduled_temperature_and_previous_center(epoch):
    module = DINOLoss(50, 4, 2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=5,
                      n_epochs=10, backend="cpu")
    module.center.copy_(torch.randn(1, 50))
    center_before = module.center.clone()
    student, teacher = torch.randn(12, 50, requires_grad=True), torch.randn(6, 50)
    loss = module(student, teacher, epoch)
    expected = dino_loss(student, teacher, center_before.view(-1), n_student_views=4, n_teacher_views=2,
                         teacher_temp=float(module.teacher_temp_schedule[epoch]), backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_center_update_is_an_ema_of_the_teacher_batch_mean():
    module = DINOLoss(20, 3, 2, n_epochs=1, center_momentum=0.8)
    teacher = torch.randn(8, 20).to(torch.bfloat16)
    module(torch.randn(12, 20).to(torch.bfloat16), teacher, 0)
    expected = 0.2 * teacher.float().mean(dim=0, keepdim=True)
    assert module.center.dtype == torch.float32 and module.center.shape == (1, 20)
    torch.testing.assert_close(module.center, expected)
    module.update_center(teacher)
    torch.testing.assert_close(module.center, 0.8 * expected + 0.2 * teacher.float().mean(dim=0, keepdim=True))


def test_center_is_a_buffer_in_the_state_dict():
    module = DINOLoss(7, 2, 1, n_epochs=3)
    assert set(module.state_dict()) == {"center"}


@pytest.mark.parametrize("arguments,match", [
    (dict(out_dim=0), "out_dim"),
    (dict(n_epochs=0), "n_epochs"),
    (dict(center_momentum=1.5), "center_momentum"),
    (dict(n_student_views=-1), "n_student_views"),
])
def test_bad_construction(arguments, match):
    options = dict(out_dim=8, n_student_views=2, n_teacher_views=1, n_epochs=3)
    options.update(arguments)
    with pytest.raises(ValueError, match=match):
        DINOLoss(**options)


def test_epoch_outside_schedule_raises():
    module = DINOLoss(8, 2, 1, n_epochs=3)
    with pytest.raises(IndexError, match="epoch"):
        module(torch.randn(4, 8), torch.randn(2, 8), 3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _teacher_of(rank: int) -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(100 + rank)) * (rank + 1)


def _update_center_in_process(rank: int, world_size: int, port: int, results) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        module = DINOLoss(16, 4, 2, n_epochs=1, center_momentum=0.9)
        module(torch.randn(12, 16), _teacher_of(rank), 0)
        results[rank] = module.center.clone()
    finally:
        dist.destroy_process_group()


def test_distributed_center_update_averages_over_processes():
    world_size = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_update_center_in_process, args=(world_size, _free_port(), results), nprocs=world_size, join=True)
        centers = [results[rank] for rank in range(world_size)]
    everything = torch.cat([_teacher_of(rank) for rank in range(world_size)])
    expected = 0.1 * everything.mean(dim=0, keepdim=True)
    for center in centers:
        torch.testing.assert_close(center, expected)
    local_only = 0.1 * _teacher_of(0).mean(dim=0, keepdim=True)
    assert not torch.allclose(centers[0], local_only)
