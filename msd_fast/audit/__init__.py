"""Privacy audit: what an honest-but-curious server can recover from what it receives.

* :func:`run_audit` -> :class:`AuditReport` (``.write(out_dir)``: markdown, PNG, JSON) -- every attack below,
  scored against the plain images next to chance and to the unattacked ciphertext (``msd-fast audit``).
* :mod:`~msd_fast.audit.jigsaw` -- ciphertext-only: undo negative-positive and pixel shuffling from statistics,
  reassemble scrambled blocks (:func:`jigsaw_attack`).
* :mod:`~msd_fast.audit.known_plaintext` -- key-table recovery from plain/encrypted pairs
  (:func:`recover_key_tables`).
* :mod:`~msd_fast.audit.token_attacks` -- token mode: position recovery and inversion.
* :mod:`~msd_fast.audit.metrics` -- PSNR, SSIM, direct / neighbour accuracy, chance levels.
"""
from .jigsaw import JigsawResult, jigsaw_attack
from .known_plaintext import RecoveredTables, recover_key_tables
from .metrics import direct_accuracy, neighbour_accuracy, psnr, ssim
from .report import AuditReport, run_audit

__all__ = ["AuditReport", "JigsawResult", "RecoveredTables", "direct_accuracy", "jigsaw_attack",
           "neighbour_accuracy", "psnr", "recover_key_tables", "run_audit", "ssim"]
