"""The demonstrations: ``msd-fast demo`` (the whole pipeline and its baselines; its config is
:class:`~msd_fast.evaluation.demo.DemoConfig`) and ``msd-fast encrypt-demo`` (the default encryption on synthetic
scans, :mod:`msd_fast.evaluation.encryption_demo`)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..evaluation.demo import DemoConfig
from ..evaluation.encryption_demo import check_geometry
from ..settings import flag


def run_demo(config: DemoConfig) -> int:
    from ..evaluation.demo import run_demo as demo

    if config.quick:
        config = DemoConfig.smoke_test(out=config.out, seed=config.seed, device=config.device,
                                       progress=config.progress, fedavg_dino=config.fedavg_dino)
    demo(config)
    return 0


@dataclasses.dataclass
class EncryptDemoConfig:
    out: str = flag("demo_out", "output folder")
    patch_size: int = flag(16, "block size")
    size: int = flag(224, "image side, a multiple of the patch size, at most 8192")
    key: Optional[str] = flag(None, "key file to use", default_text="a fresh key")

    def __post_init__(self):
        check_geometry(self.patch_size, self.size)


def run_encrypt_demo(config: EncryptDemoConfig) -> int:
    from ..evaluation.encryption_demo import run

    run(out_dir=config.out, patch_size=config.patch_size, size=config.size, key_path=config.key)
    return 0
