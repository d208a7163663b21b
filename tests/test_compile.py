"""torch.compile(fullgraph=True) of functions calling the ops: the custom ops are opaque graph nodes with fake
implementations, and keys travel as integer handles (never as their secret); masked_gather's reference is traced
into the graph instead (the baseline a compiler makes of plain PyTorch)."""
import pytest
import torch

from msd_fast import Key, decrypt_patches, encrypt_patches, masked_gather, permute_tokens, sample_views, unpermute_tokens

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


def test_compiled_reference_gather_is_traced_exact_and_bounds_checked():
    tokens, pos, prefix = (torch.randn(3, 10, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True),
                           torch.randn(2, 4, requires_grad=True))
    idx = sample_views(3, 10, 2, 0.5)

    def gather(tokens, idx):
        return masked_gather(tokens, idx, pos=pos, prefix=prefix, backend="reference")

    explained = torch._dynamo.explain(gather)(tokens, idx)
    targets = " ".join(str(node.target) for node in explained.graphs[0].graph.nodes)
    assert explained.graph_break_count == 0 and "msd_fast" not in targets  # the reference's own ops, no custom op
    compiled = torch.compile(gather, fullgraph=True, dynamic=False)
    out, expected = compiled(tokens, idx), gather(tokens, idx)
    assert torch.equal(out, expected)
    grads = torch.autograd.grad((out * out).sum(), (tokens, pos, prefix))
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad((expected * expected).sum(),
                                                                              (tokens, pos, prefix))))
    wrong = idx.clone()
    wrong[1, 2, 0] = 10
    with pytest.raises(RuntimeError, match="index out of bounds"):
        compiled(tokens, wrong)
