"""The random streams of a pretraining run, each seeded from ``derived_seed(config.seed, DOMAIN, ...)``.

A domain number keeps the streams apart: two streams with the same run seed and step never draw the same numbers,
and adding a stream (a new domain) changes none of the others -- which is what makes ``--resume`` exact. The data
order is seeded in :func:`~msd_fast.server.data.epoch_batches` from ``(seed, epoch)``.
"""
from __future__ import annotations

import numpy as np

SEED_INIT = 0xA11  # the student's initial weights (the teacher copies them): ``(seed, SEED_INIT)``
SEED_VIEWS = 0xF1E3  # a step's masked views of the global batch (same on every process): ``(seed, SEED_VIEWS, step)``
SEED_DROP_PATH = 0xD50  # a step's stochastic depth, per process: ``(seed, SEED_DROP_PATH, step, rank)``
SEED_AUGMENT = 0xA06  # a step's student input augmentation of the global batch: ``(seed, SEED_AUGMENT, step)``


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs, machines and Python versions)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))
