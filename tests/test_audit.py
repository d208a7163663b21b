"""Privacy audit: every attack on cases with a known answer, the metrics against references written here, and the
report/CLI end to end on a few small images."""
import itertools
import json
import math
import os

import pytest
import torch

from msd_fast import Key, encrypt_patches, permute_tokens
from msd_fast.evaluation.audit import jigsaw_attack, recover_key_tables, run_audit
from msd_fast.evaluation.audit.assignment import assign
from msd_fast.evaluation.audit.jigsaw import edge_dissimilarity, estimate_negpos_mask, solve_placement
from msd_fast.evaluation.audit.layout import recover_grid_layout
from msd_fast.evaluation.audit.metrics import (DIHEDRAL, PSNR_CAP_DB, chance_neighbour_accuracy, direct_accuracy,
                                    neighbour_accuracy, psnr, ssim)
from msd_fast.evaluation.audit.report import score_reassembly
from msd_fast.evaluation.audit.token_attacks import (cluster_token_positions, fit_token_inversion, label_clusters, patch_prior,
                                          public_embedder_attack)
from msd_fast.ops.patch_encryption import image_to_blocks
from msd_fast.protocol.token_embedding import INPUT_SCALE, TokenEmbedder

KEY = Key.from_secret(b"audit test key")


def smooth_images(n, size=32, channels=1, seed=0):
    """Smooth, structured uint8 images: a random tilted ramp plus two random low-frequency waves per channel, so
    every block differs and neighbouring pixels (and blocks) continue each other."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size, dtype=torch.float64),
                            torch.linspace(0, 1, size, dtype=torch.float64), indexing="ij")
    out = torch.empty(n, channels, size, size, dtype=torch.float64)
    for i, c in itertools.product(range(n), range(channels)):
        a, b, f1, f2, p1, p2 = torch.rand(6, generator=g, dtype=torch.float64)
        img = (a - 0.5) * xx + (b - 0.3) * yy + 0.35 * torch.cos(2 * math.pi * (0.5 + f1) * xx + 6 * p1) * \
            torch.cos(math.pi * (0.5 + f2) * yy + 6 * p2) + 0.2 * xx * yy
        out[i, c] = img
    lo, hi = out.amin((2, 3), keepdim=True), out.amax((2, 3), keepdim=True)
    return (10 + 235 * (out - lo) / (hi - lo)).round().to(torch.uint8)


# ---- metrics ---------------------------------------------------------------------------------------------------------

def _ssim_reference(x, y, max_value=255.0):
    """Direct 2-D Gaussian-window SSIM (Wang et al. 2004), float64, valid windows, per image."""
    size, sigma = 11, 1.5
    r = torch.arange(size, dtype=torch.float64) - 5
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    w = (g / g.sum())[None, None].expand(x.shape[1], 1, size, size)
    conv = lambda t: torch.nn.functional.conv2d(t, w, groups=x.shape[1])  # noqa: E731
    x, y = x.double(), y.double()
    mx, my = conv(x), conv(y)
    vx, vy, cxy = conv(x * x) - mx**2, conv(y * y) - my**2, conv(x * y) - mx * my
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def test_psnr_and_ssim_known_values():
    x = smooth_images(3, size=24, channels=2)
    assert torch.equal(psnr(x, x), torch.full((3,), PSNR_CAP_DB, dtype=torch.float64))
    shifted = x.double() + 5.0
    torch.testing.assert_close(psnr(shifted, x), torch.full((3,), 10 * math.log10(255.0**2 / 25.0),
                                                            dtype=torch.float64))
    torch.testing.assert_close(ssim(x, x), torch.ones(3, dtype=torch.float64))
    noisy = (x.double() + 20 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 255)
    torch.testing.assert_close(ssim(noisy, x), _ssim_reference(noisy, x))
    assert float(ssim(noisy, x).max()) < 0.95
    with pytest.raises(ValueError, match="reconstruction"):
        psnr(x[:, 0], x[:, 0])
    with pytest.raises(ValueError, match="same shape"):
        ssim(x[:2], x)


def test_placement_accuracies_and_chance():
    grid = torch.arange(12).view(1, 3, 4)
    assert float(direct_accuracy(grid)) == 1.0 and float(neighbour_accuracy(grid)) == 1.0
    rolled = torch.roll(grid, 1, dims=2)  # columns shifted by one (wrapping): 3 of 4 columns in place relative
    assert float(direct_accuracy(rolled)) == 0.0
    # horizontal pairs right: 2 per row (not across the wrap); vertical pairs all right: 3*2 + 4*2 = 14 of 17
    assert float(neighbour_accuracy(rolled)) == pytest.approx(14 / 17)
    # chance: the exact average over every arrangement of a 2x3 grid
    perms = torch.tensor(list(itertools.permutations(range(6)))).view(-1, 2, 3)
    assert float(neighbour_accuracy(perms).mean()) == pytest.approx(chance_neighbour_accuracy(2, 3))
    assert float(direct_accuracy(perms).mean()) == pytest.approx(1 / 6)


# ---- building blocks -------------------------------------------------------------------------------------------------

def test_assign_recovers_a_planted_permutation_and_respects_forbidden_pairs():
    g = torch.Generator().manual_seed(0)
    truth = torch.stack([torch.randperm(40, generator=g) for _ in range(3)])
    cost = 1 + torch.rand(3, 40, 40, generator=g, dtype=torch.float64)
    cost.scatter_(2, truth[:, :, None], 0.0)
    assert torch.equal(assign(cost), truth)
    forbidden = torch.zeros(4, 4, dtype=torch.float64)
    forbidden[0, 0] = forbidden[1, 1] = float("inf")
    result = assign(forbidden)
    assert sorted(result.tolist()) == [0, 1, 2, 3] and result[0] != 0 and result[1] != 1
    with pytest.raises(ValueError, match="cost"):
        assign(torch.zeros(3, 4))


@pytest.mark.parametrize("capacity", [1, 2])
def test_grid_layout_from_correlations_is_exact_up_to_symmetry(capacity):
    rows, cols = 5, 6
    cell = torch.arange(rows * cols).repeat_interleave(capacity)
    r, c = (cell // cols).double(), (cell % cols).double()
    corr = torch.exp(-((r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2).sqrt() / 3)
    perm = torch.randperm(cell.numel(), generator=torch.Generator().manual_seed(3))
    found = recover_grid_layout(corr[perm][:, perm], rows, cols, capacity=capacity)   # cell of each shuffled item
    truth = cell[perm]
    assert any(torch.equal(DIHEDRAL[name](torch.arange(rows * cols).view(rows, cols)).reshape(-1)[found], truth)
               for name in ("identity", "rot180", "flip_lr", "flip_ud"))


def test_negpos_mask_from_correlations():
    values = image_to_blocks(smooth_images(20, size=32), 8).reshape(-1, 64).double()
    mask = torch.rand(64, generator=torch.Generator().manual_seed(4)) < 0.5
    flipped = torch.where(mask, 255 - values, values)
    found = estimate_negpos_mask(flipped)
    assert torch.equal(found, mask) or torch.equal(found, ~mask)


def _edge_reference(blocks, method):
    """Pairwise left-right dissimilarities by explicit loops (Gallagher's MGC with the same ridge as the module)."""
    B, N, C, p, _ = blocks.shape
    x = blocks.double()
    out = torch.full((B, N, N), math.inf, dtype=torch.float64)
    grads = {side: [] for side in ("right", "left")}
    for b, i in itertools.product(range(B), range(N)):
        grads["right"].append((x[b, i, :, :, p - 1] - x[b, i, :, :, p - 2]).T)     # [p, C]: rows of gradients
        grads["left"].append((x[b, i, :, :, 0] - x[b, i, :, :, 1]).T)
    covs = {side: [torch.cov(g.T).reshape(C, C) * 1.0 for g in grads[side]] for side in grads}
    ridge = {side: 1.0 + 0.01 * torch.stack([c.diagonal() for c in covs[side]]).mean() for side in covs}
    for b, i, j in itertools.product(range(B), range(N), range(N)):
        if i == j:
            continue
        right, left = x[b, i, :, :, p - 1].T, x[b, j, :, :, 0].T                   # [p, C]
        if method == "ssd":
            out[b, i, j] = ((right - left) ** 2).sum()
            continue
        total = 0.0
        for side, edge, other, idx in (("right", right, left, b * N + i), ("left", left, right, b * N + j)):
            g = grads[side][idx]
            inverse = torch.linalg.inv(covs[side][idx] + ridge[side] * torch.eye(C, dtype=torch.float64))
            d = other - edge - g.mean(0)
            total += float(torch.einsum("rc,cd,rd->", d, inverse, d))
        out[b, i, j] = total
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_edge_dissimilarity_matches_the_explicit_formulas(channels):
    g = torch.Generator().manual_seed(channels)
    blocks = torch.randint(0, 256, (2, 5, channels, 4, 4), generator=g, dtype=torch.uint8)
    for method in ("ssd", "mgc"):
        lr, tb = edge_dissimilarity(blocks, method)
        torch.testing.assert_close(lr, _edge_reference(blocks, method))
        torch.testing.assert_close(tb, _edge_reference(blocks.transpose(-1, -2), method))
    with pytest.raises(ValueError, match="method"):
        edge_dissimilarity(blocks, "l1")


# ---- ciphertext-only -------------------------------------------------------------------------------------------------

def test_jigsaw_reassembles_a_shuffled_simple_image():
    x = smooth_images(4, size=32, seed=5)
    perms = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    shuffled = torch.stack([image_to_blocks(x[i:i + 1], 8)[0, perms[i]] for i in range(4)])   # blocks shuffled
    from msd_fast.ops.patch_encryption import blocks_to_image
    received = blocks_to_image(shuffled, 1, 32, 32, 8)
    result = jigsaw_attack(received, 8, pixel_shuffle=False, negpos=False, per_sample=True)
    assert torch.equal(result.reconstruction, x)
    assert float(direct_accuracy(torch.gather(perms, 1, result.placement).view(4, 4, 4)).mean()) == 1.0
    lr, tb = edge_dissimilarity(image_to_blocks(received, 8).reshape(4, 16, 1, 8, 8))
    placement, cost = solve_placement(lr, tb, 4, 4)
    assert torch.equal(placement, result.placement) and cost.shape == (4,)


def test_jigsaw_breaks_one_key_with_pixel_shuffling_and_negpos():
    x = smooth_images(24, size=32, seed=6)
    y = encrypt_patches(x, KEY, 8, negpos=True)
    result = jigsaw_attack(y, 8, pixel_shuffle=True, negpos=True, per_sample=False)
    row, recon = score_reassembly(result, x, 8, KEY.block_permutation(16).expand(24, 16), KEY.pixel_permutation(64),
                                  KEY.negpos_mask(64), pixel_shuffle=True, negpos=True)
    assert torch.equal(recon, x)
    assert row["direct"] == row["neighbour"] == row["pixel_layout"] == row["negpos_mask"] == 1.0
    assert math.isinf(row["psnr"]) and row["exact_images"] == 1.0


def test_jigsaw_arguments():
    with pytest.raises(ValueError, match="received"):
        jigsaw_attack(torch.zeros(2, 1, 32, 32), 8, pixel_shuffle=False, negpos=False, per_sample=False)
    with pytest.raises(ValueError, match="patch_size"):
        jigsaw_attack(torch.zeros(2, 1, 30, 30, dtype=torch.uint8), 8, pixel_shuffle=False, negpos=False,
                      per_sample=False)
    with pytest.raises(ValueError, match="method"):
        jigsaw_attack(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), 8, pixel_shuffle=False, negpos=False,
                      per_sample=False, method="l2")


# ---- known plaintext -------------------------------------------------------------------------------------------------

def test_known_plaintext_one_pair_without_pixel_shuffling():
    x = smooth_images(6, size=32, seed=7)
    y = encrypt_patches(x, KEY, 8, pixel_shuffle=False)
    tables = recover_key_tables(x[:1], y[:1], 8, pixel_shuffle=False)
    assert torch.equal(tables.src_block, KEY.block_permutation(16))
    assert torch.equal(tables.src_elem, torch.arange(64)) and tables.flip is None
    assert torch.equal(tables.decrypt(y[1:], 8), x[1:])


def test_known_plaintext_one_pair_recovers_every_table():
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, 256, (5, 3, 16, 16), generator=g, dtype=torch.uint8)   # noise: every block distinct
    y = encrypt_patches(x, KEY, 8, negpos=True)
    tables = recover_key_tables(x[:1], y[:1], 8, negpos=True)
    assert torch.equal(tables.src_block, KEY.block_permutation(4))
    assert torch.equal(tables.src_elem, KEY.pixel_permutation(192))
    assert torch.equal(tables.flip, KEY.negpos_mask(192))
    assert torch.equal(tables.decrypt(y[1:], 8), x[1:])


def test_known_plaintext_per_sample_keys_recover_pixels_not_blocks():
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, 256, (4, 1, 16, 16), generator=g, dtype=torch.uint8)
    ids = torch.arange(100, 104)
    y = encrypt_patches(x, KEY, 8, negpos=True, per_sample=True, sample_ids=ids)
    tables = recover_key_tables(x[:2], y[:2], 8, negpos=True, per_sample=True)
    assert tables.src_block is None
    assert torch.equal(tables.pair_src_block, KEY.sample_block_permutations(4, ids[:2]))
    assert torch.equal(tables.src_elem, KEY.pixel_permutation(64)) and torch.equal(tables.flip, KEY.negpos_mask(64))
    with pytest.raises(ValueError, match="same shape"):
        recover_key_tables(x[:2], y[:3], 8)


# ---- token mode ------------------------------------------------------------------------------------------------------

def _tokens(x, dim, ids):
    embedder = TokenEmbedder.from_key(KEY, patch_size=8, in_chans=1, image_size=tuple(x.shape[2:]), embed_dim=dim)
    with torch.no_grad():
        received = permute_tokens(embedder(x), KEY, ids)
    return embedder, received, KEY.token_permutations(embedder.num_tokens, ids)


def test_public_embedder_recovers_positions_and_patches_when_wide():
    x = smooth_images(12, size=32, seed=10)
    ids = torch.arange(12)
    embedder, received, truth = _tokens(x[4:], 96, ids[4:])                 # D = 96 >= L = 64
    units = (image_to_blocks(x, 8).double() / 255 - 0.5) * INPUT_SCALE
    mean, cov = patch_prior(units[:4])
    result = public_embedder_attack(received, embedder.weight.reshape(96, -1), embedder.pos, mean, cov)
    assert torch.equal(result.positions, truth)
    expected = torch.gather(units[4:], 1, truth[:, :, None].expand(-1, -1, 64))
    assert float((result.patches - expected).abs().max()) * 255 / INPUT_SCALE < 0.5   # exact after rounding


def test_secret_embedder_tokens_cluster_by_position_and_invert_from_pairs():
    x = smooth_images(40, size=32, seed=11)
    ids = torch.arange(1000, 1040)
    embedder, received, truth = _tokens(x, 96, ids)
    labels = cluster_token_positions(received)
    naming = label_clusters(labels[:5], truth[:5])                          # 5 known pairs name the clusters
    assert torch.equal(naming[labels], truth)                               # every token of every image placed
    units = (image_to_blocks(x, 8).double() / 255 - 0.5) * INPUT_SCALE
    target = torch.gather(units, 1, truth[:, :, None].expand(-1, -1, 64))
    model = fit_token_inversion(received[:30], labels[:30], target[:30], ridge=1e-8)
    error = (model.predict(received[30:], labels[30:]) - target[30:]).abs().max() * 255 / INPUT_SCALE
    assert float(error) < 1.0                                               # D >= L + N: linear inversion exact


# ---- report and CLI --------------------------------------------------------------------------------------------------

def test_run_audit_report_files_and_no_secret(tmp_path):
    x = smooth_images(16, size=32, seed=12)
    lines = []
    report = run_audit(x, KEY, patch_size=8, known_pairs=(1, 4), token_dims=(24,), max_heldout=8, figure_rows=2,
                       log=lines.append)
    assert len(report.jigsaw) == 5 and len(report.known_plaintext) == 8 and len(report.tokens) == 4
    one_key = report.jigsaw[2]
    assert one_key["config"] == "block + pixel + negative-positive" and one_key["direct"] == 1.0
    kpa = [r for r in report.known_plaintext if r["config"] == "block + pixel + negative-positive" and r["k"] == 1][0]
    assert kpa["block_order"] == kpa["pixel_permutation"] == kpa["negpos_mask"] == 1.0 and math.isinf(kpa["psnr"])
    assert report.tokens[0]["attack"].startswith("public embedder") and lines
    paths = report.write(str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["audit.json", "audit.md", "audit.png"]
    data = json.loads(open(paths["audit.json"]).read())
    assert data["setup"]["key_fingerprint"] == KEY.fingerprint and data["known_plaintext"][0]["psnr"] == "inf"
    for path in paths.values():
        content = open(path, "rb").read()
        assert KEY._secret.hex().encode() not in content and KEY._secret not in content
    assert KEY.fingerprint in repr(report) and "| block scrambling |" in open(paths["audit.md"]).read()
    with pytest.raises(ValueError, match="known_pairs|too few"):
        run_audit(x[:2], KEY, patch_size=8, known_pairs=(4,))
    with pytest.raises(TypeError, match="key"):
        run_audit(x, "secret", patch_size=8)


def test_cli_audit_quick_and_with_a_shard(tmp_path, capsys):
    from msd_fast.cli.commands import main
    from msd_fast.client.encode import encode_dataset
    from msd_fast.data import load_dataset

    key_path = tmp_path / "k.key"
    key = Key.generate()
    key.save(key_path)
    assert main(["audit", "--key", str(key_path), "--data", "synthetic:12", "--patch-size", "16", "--quick",
                 "--images", "8", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert key.fingerprint in out and key._secret.hex() not in out
    assert sorted(os.listdir(tmp_path / "a")) == ["audit.json", "audit.md", "audit.png"]

    from msd_fast.protocol.encryption import EncryptionSpec
    encode_dataset(load_dataset("synthetic:12"), key, str(tmp_path / "s.shard"), patch_size=8,
                   encryption=EncryptionSpec(scheme="permute", pixel_shuffle=True, negpos=True, per_sample=True),
                   sample_id_start=77, progress=False)
    assert main(["audit", "--key", str(key_path), "--data", "synthetic:12", "--shard", str(tmp_path / "s.shard"),
                 "--quick", "--out", str(tmp_path / "b")]) == 0
    report = json.loads(open(tmp_path / "b" / "audit.json").read())
    assert report["jigsaw"][0]["config"].startswith("this shard (per-sample block + pixel + negative-positive")
    assert report["setup"]["shard"] == "s.shard"
    capsys.readouterr()
    import numpy as np
    np.save(tmp_path / "other.npy", smooth_images(12, size=32).numpy())   # not the data the shard was encoded from
    assert main(["audit", "--key", str(key_path), "--data", str(tmp_path / "other.npy"), "--shard",
                 str(tmp_path / "s.shard"), "--quick", "--out", str(tmp_path / "c")]) == 2
    assert "does not hold these images" in capsys.readouterr().err
    other = Key.generate()
    other.save(tmp_path / "other.key")
    assert main(["audit", "--key", str(tmp_path / "other.key"), "--data", "synthetic:12", "--shard",
                 str(tmp_path / "s.shard"), "--quick", "--out", str(tmp_path / "c")]) == 2
    assert "fingerprint" in capsys.readouterr().err
