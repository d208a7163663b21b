"""torch.compile(fullgraph=True) of functions calling the ops: the custom ops are opaque graph nodes with fake
implementations, and keys travel as integer handles (never as their secret)."""
import torch

from msd_fast import Key, decrypt_patches, encrypt_patches, permute_tokens, unpermute_tokens

KEY = Key.from_secret(b"compile key")


def test_compile_encrypt_decrypt_fullgraph_inductor():
    def pipeline(x):
        y = encrypt_patches(x, KEY, 4, negpos=True)
        return decrypt_patches(y * 2.0, KEY, 4, negpos=True, max_value=2.0)

    x = torch.rand(2, 3, 8, 12)
    compiled = torch.compile(pipeline, fullgraph=True)
    torch.testing.assert_close(compiled(x), pipeline(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled(x), x * 2.0, rtol=0, atol=1e-6)


def test_compile_backward_fullgraph():
    def loss(x, tokens):
        y = encrypt_patches(x, KEY, 4, per_sample=True, sample_ids=torch.tensor([3, 1]), negpos=True)
        t = unpermute_tokens(permute_tokens(tokens, KEY, torch.tensor([3, 1])) * 3.0, KEY, torch.tensor([3, 1]))
        return (y * y).sum() + t.sum()

    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    tokens = torch.randn(2, 5, 4, requires_grad=True)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    gx, gt = torch.autograd.grad(compiled(x, tokens), (x, tokens))
    ex, et = torch.autograd.grad(loss(x, tokens), (x, tokens))
    assert torch.equal(gx, ex) and torch.equal(gt, et)
    torch.testing.assert_close(gt, torch.full_like(tokens, 3.0))
