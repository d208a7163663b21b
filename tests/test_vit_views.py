"""forward_views on tiny timm ViTs against an eager masking loop built on timm's own position embedding."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from msd_fast import sample_views
from msd_fast.vit import forward_views

from helpers import runnable_backends

# class token, register tokens, no_embed_class, global pool
MODELS = [
    dict(class_token=True, reg_tokens=0, no_embed_class=False, global_pool="token"),
    dict(class_token=True, reg_tokens=2, no_embed_class=False, global_pool="token"),
    dict(class_token=True, reg_tokens=2, no_embed_class=True, global_pool="avg"),
    dict(class_token=False, reg_tokens=0, no_embed_class=False, global_pool="avg"),
    dict(class_token=False, reg_tokens=3, no_embed_class=True, global_pool="avg"),
]


def tiny_vit(**options) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=24, depth=2, num_heads=2,
                            num_classes=5, **options)
    with torch.no_grad():  # timm initialises cls/reg tokens and pos_embed near zero; make them matter
        for parameter in (vit.cls_token, vit.reg_token, vit.pos_embed):
            if parameter is not None:
                parameter.normal_()
    return vit.eval()


def eager_views(vit: VisionTransformer, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The loop forward_views replaces: timm's full position embedding, then each view keeps its patches."""
    embedded = vit._pos_embed(tokens)  # [B, P + N, D], prefix tokens first
    P = vit.num_prefix_tokens
    outputs = []
    for view in idx:
        keep = torch.cat([torch.arange(P).expand(tokens.shape[0], P), P + view], dim=1)
        x = torch.gather(embedded, 1, keep[:, :, None].expand(-1, -1, embedded.shape[2]))
        x = vit.norm(vit.blocks(vit.norm_pre(x)))
        outputs.append(vit.forward_head(x))
    return torch.cat(outputs)


@pytest.mark.parametrize("options", MODELS)
@pytest.mark.parametrize("backend", ["reference"] + runnable_backends("cpu"))
def test_forward_views_matches_eager_loop(options, backend):
    vit = tiny_vit(**options)
    images = torch.randn(3, 1, 16, 16)
    idx = sample_views(3, 16, 2, 0.5, generator=torch.Generator().manual_seed(1))
    tokens = vit.patch_embed(images)
    expected = eager_views(vit, tokens, idx)
    parameters = [p for p in (vit.pos_embed, vit.cls_token, vit.reg_token, vit.head.weight) if p is not None]
    expected_grads = torch.autograd.grad(expected.square().sum(), parameters + [vit.patch_embed.proj.weight],
                                         retain_graph=True)

    out = forward_views(vit, tokens, idx, backend=backend)
    assert out.shape == (6, 5)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), parameters + [vit.patch_embed.proj.weight])
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want)


def test_forward_views_without_position_embedding():
    vit = tiny_vit(class_token=True, reg_tokens=1, pos_embed="none")
    assert vit.pos_embed is None
    tokens = vit.patch_embed(torch.randn(2, 1, 16, 16))
    idx = sample_views(2, 16, 3, 5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(forward_views(vit, tokens, idx), eager_views(vit, tokens, idx))


def test_forward_views_rejects_mismatched_tokens():
    vit = tiny_vit()
    idx = sample_views(2, 9, 1, 3)
    with pytest.raises(ValueError, match="N = 9 patches but vit's position embedding covers 16"):
        forward_views(vit, torch.randn(2, 9, 24), idx)
    with pytest.raises(ValueError, match="tokens must be a \\[B, N, D\\] tensor"):
        forward_views(vit, torch.randn(2, 4, 4, 24), idx)
    with pytest.raises(TypeError, match="vit must be a timm VisionTransformer"):
        forward_views(torch.nn.Linear(2, 2), torch.randn(2, 16, 24), idx)
