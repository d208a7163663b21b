"""dino_loss: every backend against the eager DINO reference (loss and student gradient), autograd, torch.compile,
argument checks. The Triton kernel runs interpreted on CPU tensors here, so its shapes are kept small."""
import pytest
import torch

from msd_fast import BackendUnavailableError, dino_loss
from msd_fast.ops.dino_loss import accumulate_dtype, dino_loss_reference

CPU_BACKENDS = ("cpu", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Loss: both sides compute in float32 (float64) from the same logits. Gradient: rounded once to the logits' dtype
# (the Triton interpreter truncates instead of rounding), so one unit of that dtype; and each probability
# exp(x - LSE) carries the rounding of its argument x = logit / temperature, a relative error of |x| * eps.
LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
             torch.float16: torch.finfo(torch.float16).eps}


def gradient_rtol(student, teacher, center, dtype, student_temp=0.1, teacher_temp=0.04):
    accumulate_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    largest_argument = max((student.double().abs().max() / student_temp).item(),
                           ((teacher.double() - center.double()).abs().max() / teacher_temp).item())
    return max(GRAD_RTOL[dtype], 4 * accumulate_eps * largest_argument)


def gradient_atol(dtype, batch, n_student_views, n_teacher_views, grad_output, student_temp, argument_rtol):
    """A few units of the accumulation (or ``argument_rtol``) in ``count·softmax - targets`` (entries <=
    n_teacher_views) times the gradient's unit, or the subnormal spacing of float16."""
    accumulate_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    pairs = n_teacher_views * n_student_views - min(n_teacher_views, n_student_views)
    unit = abs(grad_output) / (student_temp * pairs * batch)
    relative = max(8 * accumulate_eps, argument_rtol)
    return max(relative * n_teacher_views * unit, 2.0 ** -24 if dtype == torch.float16 else 0.0)


def make_inputs(n_student_views, n_teacher_views, batch, out_dim, dtype=torch.float32, scale=3.0, seed=0,
                device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(n_student_views * batch, out_dim, generator=generator) * scale).to(device, dtype)
    teacher = (torch.randn(n_teacher_views * batch, out_dim, generator=generator) * scale).to(device, dtype)
    center = (torch.randn(out_dim, generator=generator) * 0.1).to(device)
    return student, teacher, center


def loss_and_grad(backend, student, teacher, center, n_student_views, n_teacher_views, grad_output=1.0, **temps):
    student = student.detach().clone().requires_grad_()
    if backend == "reference":
        loss = dino_loss_reference(student, teacher, center, n_student_views, n_teacher_views,
                                   temps.get("student_temp", 0.1), temps.get("teacher_temp", 0.04))
    else:
        loss = dino_loss(student, teacher, center, n_student_views=n_student_views, n_teacher_views=n_teacher_views,
                         backend=backend, **temps)
    (loss * grad_output).backward()
    return loss.detach(), student.grad


def assert_matches_reference(backend, student, teacher, center, n_student_views, n_teacher_views, grad_output=1.0,
                             huge_arguments=False, **temps):
    """Compare with the reference evaluated in float64 on the same logits (exact upcast): the truth, which the
    float32 eager formulation itself misses by up to 1e-3 relative for logits of +-1e4.

    ``huge_arguments``: logits / τ reach ``L`` >> 1 (e.g. 2.5e5), so float32 rounds each LSE by up to ``L·eps`` and
    ``count·p - T`` (entries <= Vt) carries an absolute error up to ``Vt·L·eps`` gradient units where it cancels."""
    loss, grad = loss_and_grad(backend, student, teacher, center, n_student_views, n_teacher_views, grad_output,
                               **temps)
    ref_loss, ref_grad = loss_and_grad("reference", student.double(), teacher.double(), center.double(),
                                       n_student_views, n_teacher_views, grad_output, **temps)
    dtype = student.dtype
    assert loss.dtype == accumulate_dtype(dtype) and grad.dtype == dtype and grad.shape == student.shape
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype), rtol=LOSS_RTOL[dtype], atol=0)
    rtol = gradient_rtol(student, teacher, center, dtype, **temps)
    atol = gradient_atol(dtype, student.shape[0] // n_student_views, n_student_views, n_teacher_views, grad_output,
                         temps.get("student_temp", 0.1), rtol if huge_arguments else 0.0)
    torch.testing.assert_close(grad.double(), ref_grad.to(dtype).double(), rtol=rtol, atol=atol)
    return loss, grad


@pytest.mark.parametrize("n_student_views,n_teacher_views", [(1, 2), (2, 1), (2, 2), (6, 2), (12, 2), (6, 1)])
@pytest.mark.parametrize("out_dim", [1000, 4097])
@pytest.mark.parametrize("batch", [1, 3])
def test_cpu_matches_reference(n_student_views, n_teacher_views, out_dim, batch):
    inputs = make_inputs(n_student_views, n_teacher_views, batch, out_dim)
    assert_matches_reference("cpu", *inputs, n_student_views, n_teacher_views)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dim", [17, 1024, 1025, 3 * 1024 + 5])
def test_cpu_column_tiles(out_dim, dtype):
    """The CPU kernel streams rows in tiles of 1024 columns with vector loops: full and partial tiles and vector
    tails; bfloat16 keeps its exponentials in a float32 row, float32 in the gradient itself."""
    assert_matches_reference("cpu", *make_inputs(5, 2, 1, out_dim, dtype=dtype), 5, 2)


@pytest.mark.parametrize("n_student_views,n_teacher_views", [(6, 2), (2, 3)])
@pytest.mark.parametrize("direction", ["rising", "falling"])
def test_cpu_running_max_across_tiles(direction, n_student_views, n_teacher_views):
    """Logits that rise along the row move the running max at every tile (each earlier sum and distance is
    rescaled); falling ones keep the first tile's max to the end."""
    batch, out_dim = 2, 4 * 1024 + 3
    student, teacher, center = make_inputs(n_student_views, n_teacher_views, batch, out_dim)
    ramp = torch.linspace(-20.0, 20.0, out_dim)
    student = student + (ramp if direction == "rising" else ramp.flip(0))
    assert_matches_reference("cpu", student, teacher, center, n_student_views, n_teacher_views)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_loss_is_the_same_with_and_without_gradient(dtype):
    student, teacher, center = make_inputs(6, 2, 2, 3000, dtype=dtype)
    loss, _ = loss_and_grad("cpu", student, teacher, center, 6, 2)
    with torch.no_grad():
        no_grad_loss = dino_loss(student, teacher, center, n_student_views=6, n_teacher_views=2, backend="cpu")
    assert torch.equal(loss, no_grad_loss)


@pytest.mark.parametrize("batch", [1, 2])
def test_cpu_result_does_not_depend_on_threads(batch):
    """Threads share out the student rows in chunks (on three threads, of 3 and 6 rows here: samples are split
    between threads and a chunk spans two samples); every row and the sum over rows are computed the same way on
    any number of threads."""
    inputs = make_inputs(10, 2, batch, 4000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = loss_and_grad("cpu", *inputs, 10, 2)
        torch.set_num_threads(3)
        three_threads = loss_and_grad("cpu", *inputs, 10, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread[0], three_threads[0]) and torch.equal(one_thread[1], three_threads[1])


@pytest.mark.parametrize("n_student_views,n_teacher_views", [(1, 2), (2, 1), (6, 2), (12, 2)])
@pytest.mark.parametrize("out_dim", [77, 1000])
@pytest.mark.parametrize("batch", [1, 2])
def test_triton_matches_reference(n_student_views, n_teacher_views, out_dim, batch):
    inputs = make_inputs(n_student_views, n_teacher_views, batch, out_dim)
    assert_matches_reference("triton", *inputs, n_student_views, n_teacher_views)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype(backend, dtype):
    out_dim = 4097 if backend == "cpu" else 333
    inputs = make_inputs(6, 2, 2, out_dim, dtype=dtype)
    assert_matches_reference(backend, *inputs, 6, 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("out_dim", [1, 2])
def test_tiny_out_dim(backend, out_dim):
    loss, _ = assert_matches_reference(backend, *make_inputs(4, 2, 2, out_dim), 4, 2)
    if out_dim == 1:
        assert loss.item() == 0.0  # a one-class softmax is certain


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_three_teacher_views_and_temperatures(backend):
    inputs = make_inputs(5, 3, 2, 515)
    assert_matches_reference(backend, *inputs, 5, 3, student_temp=0.2, teacher_temp=0.07)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["plus_minus_1e4", "all_equal", "peaked_teacher", "cosines"])
def test_extreme_logits(backend, case):
    out_dim = 1000 if backend == "cpu" else 300
    student, teacher, center = make_inputs(6, 2, 2, out_dim, seed=1)
    generator = torch.Generator().manual_seed(2)
    if case == "plus_minus_1e4":
        # Center 0 keeps (t - c) / τ exact in float32: one float32 unit of 1e4 would move the tied teacher
        # probabilities by a percent, a conditioning problem of any float32 evaluation, not of the kernel.
        student = torch.where(torch.rand(student.shape, generator=generator) < 0.5, -1e4, 1e4)
        teacher = torch.where(torch.rand(teacher.shape, generator=generator) < 0.5, -1e4, 1e4)
        center = center.zero_()
    elif case == "all_equal":
        student, teacher, center = torch.full_like(student, 7.0), torch.full_like(teacher, -3.0), center.zero_()
    elif case == "peaked_teacher":
        teacher = torch.zeros_like(teacher)
        teacher[:, -1] = 1e4  # the teacher's peak sits in the last (partial) column chunk
        student = student * 1e3
    else:  # DINO's default head: logits are cosines in [-1, 1]
        student, teacher = torch.tanh(student), torch.tanh(teacher)
    loss, grad = assert_matches_reference(backend, student, teacher, center, 6, 2,
                                          huge_arguments=case in ("plus_minus_1e4", "peaked_teacher"))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if case == "all_equal":
        torch.testing.assert_close(loss, torch.log(torch.tensor(float(out_dim))), rtol=1e-6, atol=0)
        assert grad.abs().max() < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_output_scales_gradient(backend):
    inputs = make_inputs(6, 2, 2, 257)
    _, grad = assert_matches_reference(backend, *inputs, 6, 2, grad_output=-2.5)
    _, unit_grad = loss_and_grad(backend, *inputs, 6, 2)
    torch.testing.assert_close(grad, -2.5 * unit_grad)


def test_reference_gradcheck_float64():
    student, teacher, center = make_inputs(4, 2, 2, 13, dtype=torch.float64)
    student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: dino_loss(s, teacher, center, n_student_views=4, n_teacher_views=2, backend="reference"),
        (student,))


def test_cpu_gradient_is_the_numerical_derivative_float64():
    student, teacher, center = make_inputs(3, 2, 1, 11, dtype=torch.float64, seed=5)
    _, grad = loss_and_grad("cpu", student, teacher, center, 3, 2)
    step = 1e-6

    def loss_at(logits):
        return dino_loss(logits, teacher, center, n_student_views=3, n_teacher_views=2, backend="cpu")

    for row, col in [(0, 0), (1, 5), (2, 10)]:
        plus, minus = student.clone(), student.clone()
        plus[row, col] += step
        minus[row, col] -= step
        numeric = (loss_at(plus) - loss_at(minus)) / (2 * step)
        torch.testing.assert_close(grad[row, col], numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    student, teacher, center = make_inputs(4, 2, 2, 130)
    student_t, teacher_t = student.t().contiguous().t(), teacher.t().contiguous().t()
    assert not student_t.is_contiguous()
    assert_matches_reference(backend, student_t, teacher_t, center[::1], 4, 2)


def test_teacher_and_center_get_no_gradient():
    student, teacher, center = make_inputs(4, 2, 2, 100)
    student.requires_grad_()
    teacher.requires_grad_()
    center.requires_grad_()
    dino_loss(student, teacher, center, n_student_views=4, n_teacher_views=2, backend="cpu").backward()
    assert student.grad is not None and teacher.grad is None and center.grad is None


def test_without_student_gradient_no_gradient_is_computed():
    student, teacher, center = make_inputs(4, 2, 2, 100)
    teacher.requires_grad_()
    loss = dino_loss(student, teacher, center, n_student_views=4, n_teacher_views=2, backend="cpu")
    loss.backward()  # recorded because the teacher requires grad; nothing flows anywhere
    assert teacher.grad is None
    with torch.no_grad():
        no_grad_loss = dino_loss(student.requires_grad_(), teacher, center, n_student_views=4, n_teacher_views=2,
                                 backend="cpu")
    assert not no_grad_loss.requires_grad
    torch.testing.assert_close(no_grad_loss, loss.detach())


def test_second_backward_through_one_graph_raises():
    student, teacher, center = make_inputs(4, 2, 2, 100)
    student.requires_grad_()
    loss = dino_loss(student, teacher, center, n_student_views=4, n_teacher_views=2, backend="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_auto_backend_on_cpu_is_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv("MSD_FAST_BACKEND", raising=False)
    inputs = make_inputs(4, 2, 2, 100)
    torch.testing.assert_close(loss_and_grad("auto", *inputs, 4, 2), loss_and_grad("cpu", *inputs, 4, 2), rtol=0,
                               atol=0)


def test_torch_compile_fullgraph():
    student, teacher, center = make_inputs(6, 2, 2, 300)

    def step(student, teacher, center):
        return 2.0 * dino_loss(student, teacher, center, n_student_views=6, n_teacher_views=2, backend="cpu")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    student_c = student.clone().requires_grad_()
    loss = compiled(student_c, teacher, center)
    loss.backward()
    ref_loss, ref_grad = loss_and_grad("reference", student, teacher, center, 6, 2, grad_output=2.0)
    torch.testing.assert_close(loss.detach(), 2.0 * ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(student_c.grad, ref_grad, rtol=1e-5, atol=1e-6 * ref_grad.abs().max().item())


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        student = torch.empty(12, 50, dtype=torch.bfloat16)
        teacher, center = torch.empty(4, 50, dtype=torch.bfloat16), torch.empty(50)
        loss, grad = torch.ops.msd_fast.dino_loss(student, teacher, center, 6, 2, 0.1, 0.04, True, "cpu")
    assert loss.shape == () and loss.dtype == torch.float32
    assert grad.shape == (12, 50) and grad.dtype == torch.bfloat16


def test_op_passes_torch_library_opcheck():
    student, teacher, center = make_inputs(4, 2, 2, 64)
    torch.library.opcheck(torch.ops.msd_fast.dino_loss.default,
                          (student.requires_grad_(), teacher, center, 4, 2, 0.1, 0.04, True, "cpu"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("call,error,match", [
    (dict(student=torch.zeros(7, 10)), ValueError, "multiple of n_student_views"),
    (dict(teacher=torch.zeros(3, 10)), ValueError, "multiple of n_teacher_views"),
    (dict(teacher=torch.zeros(4, 11)), ValueError, "same K"),
    (dict(teacher=torch.zeros(6, 10)), ValueError, "same batch size"),
    (dict(center=torch.zeros(1, 10)), ValueError, r"center must have shape \(10,\)"),
    (dict(center=torch.zeros(9)), ValueError, r"center must have shape \(10,\)"),
    (dict(student=torch.zeros(12, 10, dtype=torch.float64)), TypeError, "teacher must have the student's dtype"),
    (dict(student=torch.zeros(12, 10, dtype=torch.int64)), TypeError, "student must have dtype"),
    (dict(student=torch.zeros(12)), ValueError, "student must be"),
    (dict(teacher=[[0.0] * 10] * 4), TypeError, "teacher must be a torch.Tensor"),
    (dict(n_student_views=0), ValueError, "n_student_views must be a positive int"),
    (dict(n_teacher_views=2.0), ValueError, "n_teacher_views must be a positive int"),
    (dict(student=torch.zeros(2, 10), teacher=torch.zeros(2, 10), n_student_views=1, n_teacher_views=1), ValueError,
     "no .* pair"),
    (dict(student_temp=0.0), ValueError, "student_temp must be a positive finite number"),
    (dict(teacher_temp=float("inf")), ValueError, "teacher_temp must be a positive finite number"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
])
def test_bad_input(call, error, match):
    arguments = dict(student=torch.zeros(12, 10), teacher=torch.zeros(4, 10), center=torch.zeros(10),
                     n_student_views=6, n_teacher_views=2)
    arguments.update(call)
    with pytest.raises(error, match=match):
        dino_loss(**arguments)


def test_unavailable_backend_says_why():
    student, teacher, center = make_inputs(2, 1, 1, 10)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        dino_loss(student, teacher, center, n_student_views=2, n_teacher_views=1, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,out_dim", [(64, 65536), (64, 4096), (3, 4097), (1, 1000)])
def test_gpu_matches_reference(backend, dtype, batch, out_dim):
    inputs = make_inputs(10, 2, batch, out_dim, dtype=dtype, device="cuda")
    assert_matches_reference(backend, *inputs, 10, 2, grad_output=0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("n_student_views,n_teacher_views", [(1, 2), (2, 1), (12, 2), (6, 1), (5, 3)])
def test_gpu_view_counts_and_extremes(backend, n_student_views, n_teacher_views):
    student, teacher, center = make_inputs(n_student_views, n_teacher_views, 5, 4097, device="cuda")
    assert_matches_reference(backend, student, teacher, center, n_student_views, n_teacher_views)
    signs = torch.randint(0, 2, student.shape, device="cuda") * 2 - 1
    assert_matches_reference(backend, signs * 1e4, teacher.sign() * 1e4, torch.zeros_like(center), n_student_views,
                             n_teacher_views, huge_arguments=True)
    assert_matches_reference(backend, torch.ones_like(student), torch.ones_like(teacher), center, n_student_views,
                             n_teacher_views)
