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
from msd_fast.server.dino import sinkhorn_knopp_center, teacher_temp_schedule


def sinkhorn_knopp_targets(teacher, teacher_temp, n_iterations):
    """DINOv2's Sinkhorn-Knopp in the probability domain (moderate logits only), float64: [N, K] targets."""
    q = torch.exp(teacher.double() / teacher_temp).t()
    n_prototypes, n_samples = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True) * n_prototypes
        q /= q.sum(dim=0, keepdim=True) * n_samples
    return (q * n_samples).t()


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


@pytest.mark.parametrize("n_iterations", [1, 3])
def test_sinkhorn_knopp_center_gives_dinov2_targets(n_iterations):
    teacher = torch.randn(10, 40) * 2 + torch.linspace(0, 3, 40)  # some prototypes are favoured
    center = sinkhorn_knopp_center(teacher, 0.5, n_iterations)
    assert center.shape == (40,) and center.dtype == torch.float32
    targets = torch.softmax((teacher - center) / 0.5, dim=1)
    torch.testing.assert_close(targets.double(), sinkhorn_knopp_targets(teacher, 0.5, n_iterations), rtol=1e-4,
                               atol=1e-7)
    huge = sinkhorn_knopp_center(teacher * 1e4, 0.04, n_iterations)  # exp(t / τ) would overflow; the log domain not
    assert torch.isfinite(huge).all()


def test_sinkhorn_knopp_centering_in_the_module():
    module = DINOLoss(30, 4, 2, n_epochs=2, centering="sinkhorn_knopp", backend="cpu")
    student, teacher = torch.randn(12, 30), torch.randn(6, 30)
    loss = module(student, teacher, 1)
    expected = dino_loss(student, teacher, sinkhorn_knopp_center(teacher, 0.04), n_student_views=4,
                         n_teacher_views=2, backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert torch.all(module.center == 0)  # no EMA under Sinkhorn-Knopp centering
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(30, 4, 2, n_epochs=2, centering="mean")


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
        results[rank] = (module.center.clone(), sinkhorn_knopp_center(_teacher_of(rank), 0.5))
    finally:
        dist.destroy_process_group()


def test_distributed_center_update_averages_over_processes():
    world_size = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_update_center_in_process, args=(world_size, _free_port(), results), nprocs=world_size, join=True)
        centers, sinkhorn_centers = zip(*(results[rank] for rank in range(world_size)))
    everything = torch.cat([_teacher_of(rank) for rank in range(world_size)])
    expected = 0.1 * everything.mean(dim=0, keepdim=True)
    for center in centers:
        torch.testing.assert_close(center, expected)
    local_only = 0.1 * _teacher_of(0).mean(dim=0, keepdim=True)
    assert not torch.allclose(centers[0], local_only)
    # Sinkhorn-Knopp normalises each prototype over the samples of both processes.
    expected_targets = sinkhorn_knopp_targets(everything, 0.5, 3)
    for rank, center in enumerate(sinkhorn_centers):
        targets = torch.softmax((_teacher_of(rank) - center) / 0.5, dim=1).double()
        torch.testing.assert_close(targets, expected_targets[6 * rank:6 * (rank + 1)], rtol=1e-4, atol=1e-7)
