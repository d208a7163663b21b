"""Server-side pretraining by masked sampling distillation, and export of the pretrained backbone."""
from .config import PretrainConfig
from .export import export_backbone, load_exported
from .model import DINOHead, MaskedSamplingNet
from .trainer import pretrain

__all__ = ["DINOHead", "MaskedSamplingNet", "PretrainConfig", "export_backbone", "load_exported", "pretrain"]
