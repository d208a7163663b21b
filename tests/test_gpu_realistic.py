"""GPU-only checks at realistic shapes that the per-op GPU tests leave out: grayscale 512x512 encryption round trips
and its gradient, per-sample token permutation at ViT-S/16 size, and one masked-sampling-distillation step (timm
ViT-S/16 views + DINO loss + backward) whose loss and gradients match the all-reference step. Skipped without CUDA
(the CPU suite runs the same checks on the CPU backends at smaller shapes)."""
import pytest
import timm
import torch

from msd_fast import Key, decrypt_patches, dino_loss, encrypt_patches, forward_views, permute_tokens, sample_views
from msd_fast import unpermute_tokens

from helpers import random_images, runnable_backends

KEY = Key.from_secret(b"gpu realistic shapes")
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_grayscale_512_encryption_round_trip_and_gradient(dtype):
    x = random_images((16, 1, 512, 512), dtype, device="cuda")
    options = dict(negpos=True)
    expected = encrypt_patches(x, KEY, 16, **options, backend="reference")
    for backend in runnable_backends("cuda"):
        y = encrypt_patches(x, KEY, 16, **options, backend=backend)
        assert torch.equal(y, expected), backend
        assert torch.equal(decrypt_patches(y, KEY, 16, **options, backend=backend),
                           decrypt_patches(y, KEY, 16, **options, backend="reference")), backend
        if dtype.is_floating_point:
            leaf = x.clone().requires_grad_()
            weights = torch.randn_like(x)
            (grad,) = torch.autograd.grad((encrypt_patches(leaf, KEY, 16, **options, backend=backend) * weights).sum(),
                                          leaf)
            (want,) = torch.autograd.grad((encrypt_patches(leaf, KEY, 16, **options, backend="reference")
                                           * weights).sum(), leaf)
            assert torch.equal(grad, want), backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_permutation_at_vit_s16_size(dtype):
    tokens = torch.randn(64, 196, 384, device="cuda", dtype=dtype)
    ids = torch.arange(100, 164)
    expected = permute_tokens(tokens, KEY, ids, backend="reference")
    for backend in runnable_backends("cuda"):
        permuted = permute_tokens(tokens, KEY, ids, backend=backend)
        assert torch.equal(permuted, expected), backend
        assert torch.equal(unpermute_tokens(permuted, KEY, ids, backend=backend), tokens), backend


def _distillation_step(vit, head, tokens, global_idx, local_idx, backend):
    """Loss and gradients (patch tokens, every parameter) of one MS-DINO step with every op on ``backend``."""
    tokens = tokens.detach().requires_grad_()
    with torch.no_grad():
        teacher = head(forward_views(vit, tokens, global_idx, backend=backend))
    student = torch.cat([head(forward_views(vit, tokens, idx, backend=backend)) for idx in (global_idx, local_idx)])
    center = torch.zeros(student.shape[1], device="cuda")
    loss = dino_loss(student, teacher, center, n_student_views=10, n_teacher_views=2, backend=backend)
    parameters = [tokens] + [p for p in list(vit.parameters()) + list(head.parameters()) if p.requires_grad]
    return loss, torch.autograd.grad(loss, parameters, allow_unused=True)


def test_distillation_step_matches_the_reference_step():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=2).to("cuda")
    head = torch.nn.Linear(384, 4096).to("cuda")
    images = torch.randn(16, 3, 224, 224, device="cuda")
    with torch.no_grad():
        tokens = vit.patch_embed(images)
    generator = torch.Generator("cuda").manual_seed(0)
    global_idx = sample_views(16, 196, 2, 0.5, generator=generator, device="cuda")
    local_idx = sample_views(16, 196, 8, 0.2, generator=generator, device="cuda")
    want_loss, want_grads = _distillation_step(vit, head, tokens, global_idx, local_idx, "reference")
    for backend in runnable_backends("cuda"):
        loss, grads = _distillation_step(vit, head, tokens, global_idx, local_idx, backend)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{backend}: {m}")
        for grad, want in zip(grads, want_grads):
            if want is None:
                assert grad is None
                continue
            torch.testing.assert_close(grad, want, rtol=1e-3, atol=1e-5, msg=lambda m: f"{backend}: {m}")
