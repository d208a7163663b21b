"""dino_head_loss (the DINO head's last layer fused with the loss): gradcheck of the reference, every backend against
the float64 truth and no less accurate than the unfused path it replaces, chunk invariance, that no tensor of the
whole logits' size is ever made, DINOLoss and the trainer with ``fused_head``, argument checks. Triton runs
interpreted on CPU tensors, so shapes are small."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from msd_fast import DINOLoss, dino_head_loss, dino_loss
from msd_fast.ops.dino_head_loss import CHUNK_FRACTION, default_chunk_samples, dino_head_loss_reference
from msd_fast.server.model import DINOHead

from helpers import runnable_backends

CPU_BACKENDS = ("cpu", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def make_inputs(n_student_views, n_teacher_views, batch, width, out_dim, dtype=torch.float64, seed=0, device="cpu"):
    """Unit-norm features (as DINO's head gives) and weight rows of norm ~3, so logits / τ reach tens."""
    generator = torch.Generator().manual_seed(seed)

    def unit_rows(rows):
        return torch.nn.functional.normalize(torch.randn(rows, width, generator=generator, dtype=torch.float64), dim=1)

    student = unit_rows(n_student_views * batch).to(device, dtype)
    teacher = unit_rows(n_teacher_views * batch).to(device, dtype)
    student_weight = (3 * unit_rows(out_dim)).to(device, torch.float32 if dtype != torch.float64 else dtype)
    teacher_weight = (3 * unit_rows(out_dim)).to(device, student_weight.dtype)
    center = (0.1 * torch.randn(out_dim, generator=generator)).to(device)
    return student, teacher, student_weight, teacher_weight, center


def run(function, student, teacher, student_weight, teacher_weight, center, views, grad_output=1.0, **options):
    """``(loss, teacher_sum, grad_features, grad_weight)`` of ``function`` (``"reference"`` or a backend)."""
    student = student.detach().clone().requires_grad_()
    student_weight = student_weight.detach().clone().requires_grad_()
    if function == "reference":
        loss, teacher_sum = dino_head_loss_reference(student, teacher, student_weight, teacher_weight, center, *views,
                                                     0.1, 0.04)
    else:
        loss, teacher_sum = dino_head_loss(student, teacher, student_weight, teacher_weight, center,
                                           n_student_views=views[0], n_teacher_views=views[1], backend=function,
                                           **options)
    (loss * grad_output).backward()
    return loss.detach(), teacher_sum, student.grad, student_weight.grad


def unfused(backend, student, teacher, student_weight, teacher_weight, center, views):
    """What the fused op replaces: whole logits by ``F.linear`` in the features' dtype, then ``dino_loss``."""
    student = student.detach().clone().requires_grad_()
    student_weight = student_weight.detach().clone().requires_grad_()
    logits = torch.nn.functional.linear(student, student_weight.to(student.dtype))
    teacher_logits = torch.nn.functional.linear(teacher, teacher_weight.to(teacher.dtype))
    loss = dino_loss(logits, teacher_logits, center, n_student_views=views[0], n_teacher_views=views[1],
                     backend=backend)
    loss.backward()
    return loss.detach(), teacher_logits.sum(0, dtype=torch.float32), student.grad, student_weight.grad


def relative_error(value, truth):
    return float((value.double() - truth).norm() / truth.norm().clamp_min(1e-300))


def test_reference_gradcheck_float64():
    student, teacher, student_weight, teacher_weight, center = make_inputs(3, 2, 2, 5, 7)
    student.requires_grad_()
    student_weight.requires_grad_()

    def loss(features, weight):
        return dino_head_loss_reference(features, teacher, weight, teacher_weight, center, 3, 2, 0.1, 0.04)[0]

    assert torch.autograd.gradcheck(loss, (student, student_weight))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_gradient_matches_central_differences_float64(backend):
    """gradcheck's check, by hand: gradcheck backpropagates several times through one graph, which the fused op
    refuses (it scales its saved gradients in place), so each finite difference here is a fresh call."""
    student, teacher, student_weight, teacher_weight, center = make_inputs(3, 2, 3, 4, 6)

    def loss(features, weight):
        return dino_head_loss(features, teacher, weight, teacher_weight, center, n_student_views=3,
                              n_teacher_views=2, chunk_samples=2, backend=backend)[0]

    _, _, grad_features, grad_weight = run(backend, student, teacher, student_weight, teacher_weight, center, (3, 2),
                                           chunk_samples=2)
    step = 1e-6
    for which, (value, analytic) in enumerate(((student, grad_features), (student_weight, grad_weight))):
        numeric = torch.zeros_like(value)
        for i in range(value.numel()):
            shifted = [value.clone().view(-1), value.clone().view(-1)]
            shifted[0][i] += step
            shifted[1][i] -= step
            ups, downs = [(s.view_as(value), student_weight) if which == 0 else (student, s.view_as(value))
                          for s in shifted]
            numeric.view(-1)[i] = (loss(*ups) - loss(*downs)) / (2 * step)
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("views", [(1, 2), (2, 1), (4, 2), (12, 2)])
@pytest.mark.parametrize("batch,width,out_dim,chunk", [(1, 3, 1, None), (5, 7, 37, 2), (7, 16, 129, 3)])
def test_float64_matches_the_reference(backend, views, batch, width, out_dim, chunk):
    inputs = make_inputs(*views, batch, width, out_dim)
    got = run(backend, *inputs, views, grad_output=-1.7, chunk_samples=chunk)
    truth = run("reference", *inputs, views, grad_output=-1.7)
    for value, expected in zip(got, truth):
        torch.testing.assert_close(value.double(), expected.double(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_is_as_accurate_as_the_unfused_path(backend, dtype):
    """Against the float64 truth on the same (rounded) inputs, the fused op's loss and gradients are within twice
    the unfused path's error, plus a floor of a few units of the accumulation where both are that exact."""
    views, (student, teacher, student_weight, teacher_weight, center) = (6, 2), make_inputs(6, 2, 5, 24, 301, dtype)
    got = run(backend, student, teacher, student_weight, teacher_weight, center, views, chunk_samples=2)
    baseline = unfused(backend, student, teacher, student_weight, teacher_weight, center, views)
    truth = run("reference", student.double(), teacher.double(), student_weight.double(), teacher_weight.double(),
                center.double(), views)
    assert got[2].dtype == dtype and got[3].dtype == torch.float32 and got[0].dtype == torch.float32
    floor = 8 * torch.finfo(torch.float32).eps
    for name, value, reference, expected in zip(("loss", "teacher_sum", "grad_features", "grad_weight"), got,
                                                baseline, truth):
        error, unfused_error = relative_error(value, expected.double()), relative_error(reference, expected.double())
        assert error <= 2 * unfused_error + floor, f"{name}: {error:.2e} vs unfused {unfused_error:.2e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs_and_every_chunk_size_agree(backend):
    views = (3, 2)
    student, teacher, student_weight, teacher_weight, center = make_inputs(*views, 5, 6, 33)
    truth = run("reference", student, teacher, student_weight, teacher_weight, center, views)
    strided = [torch.stack([t, t], dim=-1)[..., 0] for t in (student, teacher, student_weight, teacher_weight)]
    assert not any(t.is_contiguous() for t in strided)
    for chunk in (1, 2, 4, 5, 64):
        got = run(backend, *strided, center, views, chunk_samples=chunk)
        for value, expected in zip(got, truth):
            torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_no_tensor_of_the_whole_logits_size_is_made():
    """Forward and backward make nothing larger than one chunk's logits (or the weight's gradient)."""
    views, batch, width, out_dim, chunk = (10, 2), 16, 8, 512, 2
    student, teacher, student_weight, teacher_weight, center = make_inputs(*views, batch, width, out_dim,
                                                                           torch.float32)
    student.requires_grad_()
    student_weight.requires_grad_()
    with LargestTensor() as record:
        loss, _ = dino_head_loss(student, teacher, student_weight, teacher_weight, center, n_student_views=10,
                                 n_teacher_views=2, chunk_samples=chunk, backend="cpu")
        loss.backward()
    chunk_logits = views[0] * chunk * out_dim
    assert record.largest <= chunk_logits < sum(views) * batch * out_dim // 8
    with LargestTensor() as record:
        unfused("cpu", student, teacher, student_weight, teacher_weight, center, views)
    assert record.largest >= views[0] * batch * out_dim  # the check can fail: the unfused path makes the logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_default_chunks_stay_within_their_share_of_the_logits(dtype):
    views, batch, width, out_dim = (12, 2), 24, 8, 256
    chunk = default_chunk_samples(batch, *views, dtype)
    assert 1 < chunk < batch
    student, teacher, student_weight, teacher_weight, center = make_inputs(*views, batch, width, out_dim, dtype)
    student.requires_grad_()
    with LargestTensor() as record:
        loss, _ = dino_head_loss(student, teacher, student_weight, teacher_weight, center, n_student_views=12,
                                 n_teacher_views=2, backend="cpu")
        loss.backward()
    chunk_bytes = (2 * views[0] + views[1]) * chunk * out_dim * torch.finfo(dtype).bits // 8
    assert chunk_bytes <= CHUNK_FRACTION * sum(views) * batch * out_dim * 4
    assert record.largest <= views[0] * chunk * out_dim


def test_no_gradient_work_without_grad():
    student, teacher, student_weight, teacher_weight, center = make_inputs(3, 2, 4, 5, 9)
    student.requires_grad_()
    with torch.no_grad():
        loss, teacher_sum = dino_head_loss(student, teacher, student_weight, teacher_weight, center,
                                           n_student_views=3, n_teacher_views=2, backend="cpu")
    assert not loss.requires_grad and not teacher_sum.requires_grad
    torch.testing.assert_close(loss, run("reference", student, teacher, student_weight, teacher_weight, center,
                                         (3, 2))[0])


@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
def test_dino_loss_module_with_last_layer_inputs_equals_logits(centering):
    """DINOLoss on the heads' LastLayerInput gives the loss, student gradients and center of DINOLoss on logits."""
    torch.manual_seed(0)
    student_head, teacher_head = DINOHead(12, 50, hidden_dim=16, bottleneck_dim=8), DINOHead(12, 50, hidden_dim=16,
                                                                                             bottleneck_dim=8)
    student_in, teacher_in = torch.randn(4 * 3, 12), torch.randn(2 * 3, 12)
    results = []
    for fused in (False, True):
        loss_fn = DINOLoss(50, 4, 2, n_epochs=2, centering=centering, backend="cpu", chunk_samples=2)
        student_head.zero_grad()
        for epoch in (0, 1):
            student_out = student_head(student_in, last_layer=not fused)
            with torch.no_grad():
                teacher_out = teacher_head(teacher_in, last_layer=not fused)
            loss = loss_fn(student_out, teacher_out, epoch)
            loss.backward()
        grads = [p.grad.clone() for p in student_head.parameters() if p.grad is not None]
        results.append((loss.detach(), loss_fn.center.clone(), grads))
    (loss, center, grads), (fused_loss, fused_center, fused_grads) = results
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(fused_center, center, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(fused_grads) > 0
    for got, expected in zip(fused_grads, grads):  # in norm: BatchNorm's backward cancels, elements near 0 are noise
        assert float((got - expected).norm() / expected.norm()) < 1e-5
    with pytest.raises(TypeError, match="both be logits or both LastLayerInput"):
        loss_fn(student_head(student_in), teacher_head(teacher_in, last_layer=False), 0)


def test_bad_arguments_name_the_problem():
    student, teacher, student_weight, teacher_weight, center = make_inputs(3, 2, 4, 5, 9, torch.float32)

    def call(**changes):
        arguments = dict(student_features=student, teacher_features=teacher, student_weight=student_weight,
                         teacher_weight=teacher_weight, center=center)
        arguments.update(changes)
        return dino_head_loss(**arguments, n_student_views=3, n_teacher_views=2, backend="cpu")

    with pytest.raises(ValueError, match="student_weight must have shape \\(K, 5\\)"):
        call(student_weight=student_weight[:, :4])
    with pytest.raises(ValueError, match="teacher_weight must have shape"):
        call(teacher_weight=teacher_weight[:8])
    with pytest.raises(ValueError, match="center must have shape \\(9,\\)"):
        call(center=center[:8])
    with pytest.raises(TypeError, match="teacher_features must have student_features' dtype"):
        call(teacher_features=teacher.double())
    with pytest.raises(ValueError, match="same batch size"):
        call(teacher_features=teacher[:6])
    with pytest.raises(ValueError, match="student_features must be 2-D|student_features"):
        call(student_features=student[None])
    with pytest.raises(TypeError, match="student_weight"):
        call(student_weight=student_weight.to(torch.int32))
    with pytest.raises(ValueError, match="chunk_samples"):
        dino_head_loss(student, teacher, student_weight, teacher_weight, center, n_student_views=3,
                       n_teacher_views=2, chunk_samples=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", runnable_backends("cuda") if torch.cuda.is_available() else ["cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_as_accurate_as_the_unfused_path(backend, dtype):
    views = (10, 2)
    inputs = make_inputs(*views, 6, 64, 4099, dtype, device="cuda")
    got = run(backend, *inputs, views, chunk_samples=4)
    baseline = unfused(backend, *inputs, views)
    truth = run("reference", *(t.double() for t in inputs), views)
    floor = 8 * torch.finfo(torch.float32).eps
    for value, reference, expected in zip(got, baseline, truth):
        error, unfused_error = relative_error(value, expected.double()), relative_error(reference, expected.double())
        assert error <= 2 * unfused_error + floor


def test_pretraining_with_fused_head_follows_the_unfused_run(tmp_path):
    """Two epochs of ``msd-fast pretrain`` with ``--fused-head`` give the unfused run's losses, center and weights,
    up to summation order (:func:`test_pretrain.assert_same_training`)."""
    from test_pretrain import assert_same_training, structured_images, tiny_config, write_client_shard
    from msd_fast.server import pretrain
    from msd_fast.server.checkpoint import load_checkpoint
    from msd_fast.server.trainer import Pretraining

    shards = [write_client_shard(tmp_path / f"client{c}.shard", structured_images(32, seed=c)) for c in range(2)]
    runs = {}
    for fused in (False, True):
        config = tiny_config(shards, tmp_path / f"fused_{fused}", epochs=2, fused_head=fused)
        pretrain(config)
        runs[fused] = load_checkpoint(str(tmp_path / f"fused_{fused}" / "checkpoint.pt"))
    unfused_run, fused_run = runs[False], runs[True]
    losses = [[epoch["loss"] for epoch in run["history"]] for run in (unfused_run, fused_run)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)
    center, fused_center = unfused_run["dino_loss"]["center"], fused_run["dino_loss"]["center"]
    assert float((fused_center - center).norm() / center.norm()) < 1e-4
    assert_same_training(unfused_run, fused_run, Pretraining(config).lr.sum())
