"""The server's commands: ``msd-fast pretrain`` (its config is :class:`~msd_fast.server.config.PretrainConfig`)
and ``msd-fast export`` (the pretrained backbone as timm safetensors)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..server.config import PretrainConfig
from ..settings import check_required, flag


def run_pretrain(config: PretrainConfig) -> int:
    from ..server import pretrain

    summary = pretrain(config)
    if summary["history"]:
        last = summary["history"][-1]
        print(f"pretrained {summary['epochs']} epochs ({summary['steps']} steps, {summary['processes']} process(es)): "
              f"final epoch loss {last['loss']:.4f}, {last['images_per_s']:.1f} images/s; "
              f"checkpoint {summary['checkpoint']}")
    return 0


@dataclasses.dataclass
class ExportConfig:
    checkpoint: Optional[str] = flag(None, "a pretraining checkpoint.pt", required=True)
    out: Optional[str] = flag(None, "the .safetensors file to write", required=True)
    force: bool = flag(False, "replace an existing file")

    def __post_init__(self):
        check_required(self)


def run_export(config: ExportConfig) -> int:
    from ..server import export_backbone

    metadata = export_backbone(config.checkpoint, config.out, overwrite=config.force)
    print(f"exported {metadata['arch']} ({metadata['mode']} mode, patch {metadata['patch_size']}, "
          f"key fingerprint {metadata['key_fingerprint']}) to {config.out}")
    return 0
