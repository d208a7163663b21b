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


def _loop_step(params: list, states: dict, lr: float, weight_decay: float, rowwise: bool, betas=(0.9, 0.999),
               eps=1e-8) -> None:
    """The update parameter by parameter (the optimiser's arithmetic written as a plain loop): its oracle."""
    beta1, beta2 = betas
    for param in params:
        if param.grad is None:
            continue
        state = states.setdefault(param, {"step": 0, "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros(
            (param.shape[0],) + (1,) * (param.dim() - 1) if rowwise else param.shape, dtype=param.dtype)})
        state["step"] += 1
        param.mul_(1 - lr * weight_decay)
        state["exp_avg"].lerp_(param.grad, 1 - beta1)
        square = param.grad * param.grad
        if rowwise and param.dim() > 1:
            square = square.mean(dim=tuple(range(1, param.dim())), keepdim=True)
        state["exp_avg_sq"].mul_(beta2).add_(square, alpha=1 - beta2)
        denominator = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(eps)
        param.addcdiv_(state["exp_avg"], denominator, value=-lr / (1 - beta1 ** state["step"]))


def test_batched_update_equals_the_parameter_loop_bit_for_bit_with_uneven_steps():
    generator = torch.Generator().manual_seed(2)
    shapes = [(5, 3, 2, 2), (7,), (4, 6), (1,)]
    for rowwise in (False, True):
        mine = [torch.randn(shape, generator=generator) for shape in shapes]
        oracle = [p.clone() for p in mine]
        optimizer = KeyInvariantAdamW([{"params": mine, "rowwise": rowwise}], lr=0.01, weight_decay=0.05)
        states: dict = {}
        for step in range(4):
            grads = [torch.randn(shape, generator=generator) for shape in shapes]
            for index, (a, b, grad) in enumerate(zip(mine, oracle, grads)):
                skipped = index == 1 and step < 2  # one parameter starts late: two step counts in one group
                a.grad, b.grad = (None, None) if skipped else (grad.clone(), grad.clone())
            optimizer.step()
            with torch.no_grad():
                _loop_step(oracle, states, lr=0.01, weight_decay=0.05, rowwise=rowwise)
        assert all(torch.equal(a, b) for a, b in zip(mine, oracle))
        assert [optimizer.state[p]["step"] for p in mine] == [4, 2, 4, 4]
