"""AdamW whose update of the patch embedding does not depend on the encryption's basis.

The dense encryption feeds the server ``y = A x'`` with ``A`` a secret orthogonal matrix acting on the ``L`` values of
a block, so the patch-embedding weight the server learns is ``W' = W A^T`` and its gradient is ``G A^T``. Adam's
per-coordinate second moment is not invariant to that rotation: the same data would be optimised differently
depending on the key. Sharing the second moment over each output row (``v_r = mean_j g_rj^2``, Adafactor-style) makes
the whole update equivariant: ``||g_r A^T|| = ||g_r||``, the first moment is linear, weight decay is an L2 shrink, so
the update on ciphertext is exactly ``dW A^T`` -- training on the dense ciphertext follows the trajectory of training
on plain images (up to the initialisation's law). The permutation schemes are equivariant under both forms.

:class:`KeyInvariantAdamW` is ``torch.optim.AdamW`` (decoupled weight decay, bias correction) with that row-shared
second moment for the parameter groups marked ``rowwise=True``; every other group is plain AdamW.
"""
from __future__ import annotations


import torch


class KeyInvariantAdamW(torch.optim.Optimizer):
    """AdamW; groups with ``rowwise=True`` share the second moment over every dimension but the first.

    Args:
        params: parameters or groups (a group may set ``lr``, ``weight_decay``, ``rowwise``).
        lr, betas, eps, weight_decay: as for ``torch.optim.AdamW`` (defaults included).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rowwise=False))

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient: a few ``torch._foreach_*`` calls per group and step
        count (the same per-parameter arithmetic as a loop, without its ~10 launches per parameter)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_step: dict = {}  # parameters at the same step share the bias corrections
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    moment_shape = (param.shape[0],) + (1,) * (param.dim() - 1) if group["rowwise"] else param.shape
                    state["exp_avg_sq"] = torch.zeros(moment_shape, dtype=param.dtype, device=param.device)
                state["step"] += 1
                by_step.setdefault(state["step"], []).append(param)
            for step, params in by_step.items():
                self._update(group, params, step)
        return loss

    def _update(self, group: dict, params: list, step: int) -> None:
        """AdamW on ``params`` (all at ``step``; the rowwise second moment where the group asks for it)."""
        beta1, beta2 = group["betas"]
        grads = [param.grad for param in params]
        exp_avgs = [self.state[param]["exp_avg"] for param in params]
        exp_avg_sqs = [self.state[param]["exp_avg_sq"] for param in params]
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        squares = torch._foreach_mul(grads, grads)
        if group["rowwise"]:
            squares = [square.mean(dim=tuple(range(1, square.dim())), keepdim=True) if square.dim() > 1 else square
                       for square in squares]
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_add_(exp_avg_sqs, squares, alpha=1 - beta2)
        denominators = torch._foreach_div(exp_avg_sqs, 1 - beta2 ** step)
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denominators, value=-group["lr"] / (1 - beta1 ** step))
