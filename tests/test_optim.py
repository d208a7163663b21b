"""KeyInvariantAdamW: plain AdamW where it should be, and an update that does not depend on the key's basis."""
import torch

from msd_fast import Key
from msd_fast.server.optim import KeyInvariantAdamW

A = Key.from_secret(b"optimiser test key").block_matrix(12)


def _train(weight: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, rowwise: bool, steps: int = 5):
    weight = weight.clone().requires_grad_(True)
    optimizer = KeyInvariantAdamW([{"params": [weight], "rowwise": rowwise}], lr=0.05, weight_decay=0.1)
    for _ in range(steps):
        loss = ((inputs @ weight.t() - targets) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach()


def test_matches_torch_adamw_without_rowwise():
    torch.manual_seed(0)
    inputs, targets, weight = torch.randn(20, 12, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64), \
        torch.randn(5, 12, dtype=torch.float64)
    reference = weight.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([reference], lr=0.05, weight_decay=0.1)
    for _ in range(5):
        loss = ((inputs @ reference.t() - targets) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(_train(weight, inputs, targets, rowwise=False), reference.detach(), rtol=1e-12,
                               atol=1e-12)


def test_rowwise_update_commutes_with_an_orthogonal_input_transform():
    torch.manual_seed(1)
    inputs, targets, weight = torch.randn(20, 12, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64), \
        torch.randn(5, 12, dtype=torch.float64)
    plain = _train(weight, inputs, targets, rowwise=True)
    # the server sees y = A x and starts from W A^T: it must end at (plain result) A^T
    encrypted = _train(weight @ A.t(), inputs @ A.t(), targets, rowwise=True)
    torch.testing.assert_close(encrypted, plain @ A.t(), rtol=1e-10, atol=1e-10)
    # per-coordinate AdamW does not commute (what the rowwise moment fixes)
    adam_plain = _train(weight, inputs, targets, rowwise=False)
    adam_encrypted = _train(weight @ A.t(), inputs @ A.t(), targets, rowwise=False)
    assert (adam_encrypted - adam_plain @ A.t()).abs().max() > 1e-3
