"""Is the embedded synthetic dataset learnable, and fair? Measures, per seed:

* ``vit_all``  -- a demo-sized ViT (timm ``vit_tiny_patch16_224`` at 32x32, patch 8, depth 4, width 96, 3 heads)
  trained from scratch on all labels of the training split, accuracy on the test split (target >= 0.90);
* ``vit_10``   -- the same with 10 % of the labels (stratified), target clearly lower (about 0.4-0.7);
* ``knn_10`` / ``knn_all`` -- raw-pixel k-NN (k = 5, cosine on pixels centred by the training mean image), target
  for ``knn_10`` below about 0.75 (the set is not trivially separable in pixel space);
* ``stats_lr`` -- logistic regression on per-image [mean, std, 5 quantiles] with all labels (fairness: global pixel
  statistics alone should be well below the spatial models).

Training: AdamW (lr 1e-3, weight decay 0.05), linear warm-up over 10 % of the steps then cosine to 0, label smoothing
0.1, batch 64, no flips or other augmentation, inputs standardised by one scalar mean/std of the training pixels.
The test split is an independent draw and is only used for the final number (no selection on it).

    OMP_NUM_THREADS=1 python bench/synthetic_check.py --seeds 0 1 --steps 2000
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.permutation(idx)[:max(1, round(fraction * len(idx)))])
    return np.sort(np.concatenate(keep))


def pixel_statistics(x: np.ndarray) -> np.ndarray:
    """Per image: mean, std and the 5, 25, 50, 75, 95 % quantiles of its pixel values."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    return np.concatenate([flat.mean(1, keepdims=True), flat.std(1, keepdims=True),
                           np.quantile(flat, [0.05, 0.25, 0.5, 0.75, 0.95], axis=1).T], 1)


def stats_lr(x_train, y_train, x_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    model.fit(pixel_statistics(x_train), y_train)
    return float((model.predict(pixel_statistics(x_test)) == y_test).mean())


def knn(x_train, y_train, x_test, y_test, k: int = 5) -> float:
    a = x_train.reshape(len(x_train), -1).astype(np.float64)
    b = x_test.reshape(len(x_test), -1).astype(np.float64)
    mean = a.mean(0)
    a, b = a - mean, b - mean
    a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-12
    b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-12
    nearest = np.argsort(-(b @ a.T), axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(b), int(y_train.max()) + 1))
    np.add.at(votes, (np.arange(len(b))[:, None], y_train[nearest]), 1.0)
    return float((votes.argmax(1) == y_test).mean())


def train_vit(x_train, y_train, x_test, y_test, n_classes: int, steps: int, seed: int, batch: int = 64,
              lr: float = 1e-3, size: int = 32) -> tuple[float, float, float, list]:
    """Returns (test accuracy, final training-batch accuracy, seconds, confusion matrix [true][predicted])."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=8, in_chans=1,
                              depth=4, embed_dim=96, num_heads=3, num_classes=n_classes)
    xt = torch.from_numpy(x_train).float()
    mean, std = xt.mean(), xt.std()
    xt = (xt - mean) / std
    xs = (torch.from_numpy(x_test).float() - mean) / std
    yt = torch.from_numpy(y_train).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    generator = torch.Generator().manual_seed(seed)
    order, position, recent = torch.randperm(len(xt), generator=generator), 0, []
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        if position + batch > len(xt):
            order, position = torch.randperm(len(xt), generator=generator), 0
        rows = order[position:position + batch] if len(xt) >= batch else torch.randint(
            len(xt), (batch,), generator=generator)
        position += batch
        logits = model(xt[rows])
        loss = F.cross_entropy(logits, yt[rows], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        recent = (recent + [(logits.argmax(1) == yt[rows]).float().mean().item()])[-20:]
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(xs[i:i + 256]).argmax(1) for i in range(0, len(xs), 256)])
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y_test, predictions.numpy()), 1)
    return float((predictions.numpy() == y_test).mean()), float(np.mean(recent)), seconds, confusion.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=2000, help="ViT steps with all labels")
    parser.add_argument("--steps-few", type=int, default=None, help="ViT steps with 10 %% labels (default: --steps)")
    parser.add_argument("--train", type=int, default=1800)
    parser.add_argument("--test", type=int, default=600)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--skip-vit", action="store_true", help="only the k-NN and statistics baselines")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from msd_fast.data.synthetic import CLASS_NAMES, synthetic_dataset

    results = []
    for seed in args.seeds:
        start = time.perf_counter()
        train = synthetic_dataset(args.train, size=args.size, seed=seed, split="train")
        test = synthetic_dataset(args.test, size=args.size, seed=seed, split="test")
        generate_s = time.perf_counter() - start
        x_train, y_train = train.to_tensor().numpy().astype(np.float32), train.labels.numpy()
        x_test, y_test = test.to_tensor().numpy().astype(np.float32), test.labels.numpy()
        few = stratified_subset(y_train, args.fraction, seed)
        row = dict(seed=seed, generate_s=round(generate_s, 2), n_train=len(y_train), n_few=len(few),
                   n_test=len(y_test), chance=round(1 / len(CLASS_NAMES), 3),
                   stats_lr=stats_lr(x_train, y_train, x_test, y_test),
                   stats_lr_10=stats_lr(x_train[few], y_train[few], x_test, y_test),
                   knn_all=knn(x_train, y_train, x_test, y_test),
                   knn_10=knn(x_train[few], y_train[few], x_test, y_test))
        print(json.dumps(row), flush=True)
        if not args.skip_vit:
            n = len(CLASS_NAMES)
            acc, train_acc, seconds, confusion = train_vit(x_train, y_train, x_test, y_test, n, args.steps, seed,
                                                           size=args.size)
            row.update(vit_all=acc, vit_all_train=round(train_acc, 3), vit_all_s=round(seconds, 1))
            print("confusion (rows: true", CLASS_NAMES, "):", confusion, flush=True)
            print(json.dumps(row), flush=True)
            acc, train_acc, seconds, _ = train_vit(x_train[few], y_train[few], x_test, y_test, n,
                                                   args.steps_few or args.steps, seed, size=args.size)
            row.update(vit_10=acc, vit_10_train=round(train_acc, 3), vit_10_s=round(seconds, 1))
            print(json.dumps(row), flush=True)
        results.append(row)
    keys = [k for k in results[0] if k not in ("seed",)]
    summary = {k: (float(np.mean([r[k] for r in results])), float(np.std([r[k] for r in results]))) for k in keys}
    print("mean/std over seeds:", json.dumps({k: [round(m, 3), round(s, 3)] for k, (m, s) in summary.items()}))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(results=results, summary=summary, steps=args.steps, steps_few=args.steps_few or args.steps),
                      handle, indent=1)


if __name__ == "__main__":
    main()
