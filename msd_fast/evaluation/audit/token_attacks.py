"""Attacks on token mode: where did each token come from, and what patch does it show?

In token mode a client uploads, per image, ``N`` tokens ``t = W z + pos[n]`` (``z``: the block's ``L = C p p`` values
scaled to ``[-2, 2]``, ``W: [D, L]`` and ``pos: [N, D]`` a frozen key-derived embedder, :class:`~msd_fast.
token_embedding.TokenEmbedder`) in a per-image key-derived order. The attacks:

* **Public embedder** (:func:`public_embedder_attack`): if ``W`` and ``pos`` were known, each token's position is the
  ``n`` under which ``t - pos[n]`` is most plausible as ``W z`` for an image-like ``z`` -- a Gaussian classifier with
  a patch prior (mean and covariance of patches from public images of the same kind); tokens of one image take
  distinct positions (one-to-one assignment). The patch is then the posterior mean (Wiener inversion), exact when
  ``D >= L``.
* **Secret embedder, tokens only** (:func:`cluster_token_positions`, :func:`cluster_layout`): every image has exactly
  one token per position and ``pos[n]`` is the same offset in every image, so tokens cluster by position across the
  shard. Constrained k-means (each image's tokens assigned one-to-one to ``N`` centroids, Euclidean then Mahalanobis
  with the pooled within-cluster covariance) recovers *which tokens share a position* -- it undoes the per-sample
  permutation up to one unknown global relabelling. Neighbouring positions carry correlated content, so the
  clusters' cross-covariance lays them out on the grid (:func:`~msd_fast.evaluation.audit.layout.recover_grid_layout`), up to
  a symmetry of the grid.
* **Secret embedder with k known pairs** (:func:`fit_token_inversion`): ridge regression from tokens (plus a one-hot
  of their position cluster) to patches, fitted on ``k`` images whose token-to-patch correspondence is known; the
  known pairs also name each cluster's position (majority vote).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .assignment import assign
from .layout import recover_grid_layout

_RIDGE_REL = 1e-6  # noise floor of the Gaussian classifier, relative to the mean token variance


def _check_tokens(tokens: object, name: str = "tokens") -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or not tokens.dtype.is_floating_point:
        got = (tokens.dtype, tuple(tokens.shape)) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be a float [B, N, D] tensor, got {got}")
    if tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one image and one token")
    return tokens


def patch_prior(patches: torch.Tensor, shrinkage: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[L]`` and covariance ``[L, L]`` (float64, shrunk towards its diagonal mean by ``shrinkage``) of patch
    vectors ``[..., L]`` -- the attacker's model of what a patch looks like, from public images."""
    z = patches.reshape(-1, patches.shape[-1]).double()
    if z.shape[0] < 2:
        raise ValueError("patches must hold at least two patch vectors")
    mean = z.mean(0)
    cov = torch.cov(z.T).reshape(z.shape[1], z.shape[1])
    return mean, cov + shrinkage * float(cov.diagonal().mean().clamp(min=1e-12)) * torch.eye(z.shape[1],
                                                                                           dtype=torch.float64)


@dataclasses.dataclass
class TokenAttackResult:
    """``positions``: int64 ``[B, N]``, the position (row-major block index) the attacker gives each received token;
    ``patches``: float64 ``[B, N, L]`` or None, the attacker's patch for each received token (the embedder's input
    units, ``(value / max_value - 0.5) * INPUT_SCALE``)."""

    positions: torch.Tensor
    patches: Optional[torch.Tensor]


def public_embedder_attack(tokens: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor, prior_mean: torch.Tensor,
                           prior_cov: torch.Tensor) -> TokenAttackResult:
    """Position recovery and Wiener inversion of tokens with a known embedder.

    Args:
        tokens: float ``[B, N, D]`` received (permuted) tokens.
        weight: ``[D, L]`` the embedder's patch weight (``TokenEmbedder.weight.reshape(D, -1)``).
        pos: ``[N, D]`` its position embedding.
        prior_mean, prior_cov: ``[L]``, ``[L, L]`` patch prior in the embedder's input units (:func:`patch_prior`).

    Returns:
        :class:`TokenAttackResult` with positions and patches.
    """
    tokens = _check_tokens(tokens)
    B, N, D = tokens.shape
    W = weight.double().reshape(D, -1)
    L = W.shape[1]
    if tuple(pos.shape) != (N, D) or tuple(prior_mean.shape) != (L,) or tuple(prior_cov.shape) != (L, L):
        raise ValueError(f"pos must be [{N}, {D}], prior_mean [{L}] and prior_cov [{L}, {L}] for weight [{D}, {L}]")
    t = tokens.double()
    means = pos.double() + (W @ prior_mean.double())[None]                       # [N, D] class means
    token_cov = W @ prior_cov.double() @ W.T
    token_cov = token_cov + _RIDGE_REL * float(token_cov.diagonal().mean().clamp(min=1e-12)) * torch.eye(
        D, dtype=torch.float64)
    precision = torch.linalg.inv(token_cov)
    root = torch.linalg.cholesky(precision)                                     # precision = root @ root.T
    tw, mw = t @ root, means @ root
    scores = (tw.pow(2).sum(-1)[:, :, None] + mw.pow(2).sum(-1)[None, None, :] - 2 * tw @ mw.T)  # [B, N, N]
    positions = assign(scores)                                                  # token i -> position
    residual = t - means[positions]                                             # [B, N, D]
    gain = prior_cov.double() @ W.T @ precision                                 # [L, D]
    patches = prior_mean.double() + residual @ gain.T
    return TokenAttackResult(positions=positions, patches=patches)


def cluster_token_positions(tokens: torch.Tensor, *, iterations: int = 20, euclidean_iterations: int = 3,
                            ) -> torch.Tensor:
    """Group tokens by (unknown) position across images: constrained k-means with one token per cluster per image.

    Args:
        tokens: float ``[B, N, D]``.
        iterations: assignment/update rounds at most (stops when nothing changes).
        euclidean_iterations: rounds before switching to the pooled within-cluster Mahalanobis distance.

    Returns:
        int64 ``[B, N]``: cluster label of each token, a permutation per image; labels mean the same position in
        every image (which one is not identified).
    """
    tokens = _check_tokens(tokens)
    B, N, D = tokens.shape
    t = tokens.double()
    centroids = t[0].clone()
    labels = torch.arange(N).expand(B, N).clone()
    whiten = torch.eye(D, dtype=torch.float64)
    for round_ in range(iterations):
        tw, cw = t @ whiten, centroids @ whiten
        cost = tw.pow(2).sum(-1)[:, :, None] + cw.pow(2).sum(-1)[None, None, :] - 2 * tw @ cw.T
        new = assign(cost)
        changed = round_ == 0 or not torch.equal(new, labels)
        labels = new
        members = torch.zeros(N, D, dtype=torch.float64).index_add_(0, labels.reshape(-1), t.reshape(-1, D))
        centroids = members / B
        if round_ + 1 >= euclidean_iterations:
            within = t - centroids[labels]
            cov = within.reshape(-1, D).T @ within.reshape(-1, D) / max(B * N - N, 1)
            cov = cov + 1e-6 * float(cov.diagonal().mean().clamp(min=1e-12)) * torch.eye(D, dtype=torch.float64)
            whiten = torch.linalg.cholesky(torch.linalg.inv(cov))
        if not changed and round_ + 1 > euclidean_iterations:
            break
    return labels


def cluster_layout(tokens: torch.Tensor, labels: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Lay the position clusters out on the ``rows x cols`` grid from the cross-covariance of their tokens.

    Args:
        tokens: float ``[B, N, D]``; labels: int64 ``[B, N]`` from :func:`cluster_token_positions`.

    Returns:
        int64 ``[N]``: the grid cell (row-major) of each cluster -- up to a symmetry of the grid.
    """
    tokens = _check_tokens(tokens)
    B, N, D = tokens.shape
    if N != rows * cols:
        raise ValueError(f"tokens hold {N} tokens per image but the grid is {rows}x{cols}")
    by_cluster = torch.empty_like(tokens, dtype=torch.float64)
    by_cluster.scatter_(1, labels[:, :, None].expand(B, N, D), tokens.double())   # [B, cluster, D]
    centred = by_cluster - by_cluster.mean(0)
    similarity = torch.einsum("bid,bjd->ij", centred, centred) / max(B - 1, 1)
    return recover_grid_layout(similarity, rows, cols)


@dataclasses.dataclass
class TokenInversion:
    """A ridge regression from tokens (and a one-hot of their position cluster) to patches: ``coef [D + N + 1, L]``
    over features ``[t, onehot(cluster), 1]``."""

    coef: torch.Tensor
    n_clusters: int

    def features(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        onehot = torch.nn.functional.one_hot(labels, self.n_clusters).double()
        return torch.cat([tokens.double(), onehot, torch.ones(B, N, 1, dtype=torch.float64)], -1)

    def predict(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Patches ``[B, N, L]`` (embedder input units) for tokens ``[B, N, D]`` with cluster labels ``[B, N]``."""
        return self.features(_check_tokens(tokens), labels) @ self.coef


def fit_token_inversion(tokens: torch.Tensor, labels: torch.Tensor, patches: torch.Tensor, *,
                        ridge: float = 1e-3) -> TokenInversion:
    """Fit the ridge regression on known pairs.

    Args:
        tokens: float ``[k, N, D]`` known tokens; labels: int64 ``[k, N]`` their position clusters;
        patches: ``[k, N, L]`` the patch each token came from (embedder input units).
        ridge: penalty, relative to the mean feature variance (the intercept is not penalised).
    """
    tokens = _check_tokens(tokens)
    if patches.shape[:2] != tokens.shape[:2] or labels.shape != tokens.shape[:2]:
        raise ValueError("tokens [k, N, D], labels [k, N] and patches [k, N, L] must agree in k and N")
    model = TokenInversion(coef=torch.empty(0), n_clusters=tokens.shape[1])
    X = model.features(tokens, labels).reshape(-1, tokens.shape[2] + tokens.shape[1] + 1)
    Y = patches.double().reshape(X.shape[0], -1)
    penalty = torch.full((X.shape[1],), ridge * float(X[:, :-1].var(0).mean().clamp(min=1e-12)) * X.shape[0],
                         dtype=torch.float64)
    penalty[-1] = 0.0
    model.coef = torch.linalg.solve(X.T @ X + torch.diag(penalty), X.T @ Y)
    return model


def label_clusters(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Name each cluster's position from known tokens: int64 ``[N]`` (one-to-one, by majority of the known tokens'
    true positions). ``labels``, ``positions``: int64 ``[k, N]`` for the known pairs."""
    N = labels.shape[1]
    votes = torch.zeros(N, N, dtype=torch.float64)
    votes.index_put_((labels.reshape(-1), positions.reshape(-1)), torch.ones(labels.numel(), dtype=torch.float64),
                     accumulate=True)
    return assign(-votes)


def symmetric_positions(cells: torch.Tensor, rows: int, cols: int, symmetry) -> torch.Tensor:
    """Where grid cells land under a grid symmetry (a function on ``[..., rows, cols]`` tensors, as in
    :data:`~msd_fast.evaluation.audit.metrics.DIHEDRAL`): int64 like ``cells``."""
    moved = symmetry(torch.arange(rows * cols).view(rows, cols)).reshape(-1)   # moved[position] = source cell
    return torch.argsort(moved)[cells]


__all__ = ["TokenAttackResult", "TokenInversion", "cluster_layout", "cluster_token_positions", "fit_token_inversion",
           "label_clusters", "patch_prior", "public_embedder_attack", "symmetric_positions"]
