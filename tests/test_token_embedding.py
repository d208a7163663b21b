"""The key-derived token-mode embedder: deterministic per key, exact patch embedding, shape checks."""
import pytest
import torch

from msd_fast import Key
from msd_fast.protocol.token_embedding import INPUT_SCALE, TokenEmbedder

KEY = Key.from_secret(b"token embedder test")


def embedder(key=KEY, **changes):
    options = dict(patch_size=4, in_chans=3, image_size=(8, 12), embed_dim=5, max_value=255.0) | changes
    return TokenEmbedder.from_key(key, **options)


def test_same_key_same_embedder_other_key_other_embedder():
    a, b = embedder(), embedder(Key.from_secret(b"token embedder test"))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.pos, b.pos)
    c = embedder(Key.from_secret(b"another key"))
    assert not torch.equal(a.weight, c.weight) and not torch.equal(a.pos, c.pos)
    assert not torch.equal(a.weight.flatten()[:20], embedder(embed_dim=6).weight.flatten()[:20])
    assert list(a.parameters()) == []  # frozen: nothing to train, nothing for an optimiser to move


def test_forward_is_the_patch_embedding_plus_position():
    module = embedder()
    x = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8)
    tokens = module(x)
    assert tokens.shape == (2, 6, 5) and tokens.dtype == torch.float32
    scaled = (x.double() / 255.0 - 0.5) * INPUT_SCALE
    patches = scaled.unfold(2, 4, 4).unfold(3, 4, 4)  # [B, C, 2, 3, 4, 4]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 6, 48)  # blocks row-major, values in (C, p, p) order
    expected = patches @ module.weight.double().reshape(5, 48).T + module.pos.double()
    torch.testing.assert_close(tokens.double(), expected, rtol=1e-5, atol=1e-5)
    assert abs(float(module.pos.std()) - 1.0) < 0.3


def test_bad_arguments():
    with pytest.raises(ValueError, match="must divide"):
        embedder(image_size=(8, 10))
    with pytest.raises(ValueError, match="images must be"):
        embedder()(torch.zeros(2, 1, 8, 12))
    with pytest.raises(TypeError, match="key"):
        TokenEmbedder.from_key("secret", patch_size=4, in_chans=3, image_size=(8, 12), embed_dim=5)
