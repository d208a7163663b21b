"""Privacy audit: what an honest-but-curious server can recover from what it receives.

* :func:`run_audit` -> :class:`AuditReport` (``.write(out_dir)``: markdown, PNG, JSON) -- every attack below,
  scored against the plain images next to chance and to the unattacked ciphertext (``msd-fast audit``).
* :mod:`~msd_fast.evaluation.audit.jigsaw` -- ciphertext-only: undo negative-positive and pixel shuffling from statistics,
  reassemble scrambled blocks (:func:`jigsaw_attack`).
* :mod:`~msd_fast.evaluation.audit.known_plaintext` -- key-table recovery from plain/encrypted pairs
  (:func:`recover_key_tables`).
* :mod:`~msd_fast.evaluation.audit.token_attacks` -- token mode: position recovery and inversion.
* :mod:`~msd_fast.evaluation.audit.statistics_attack` -- dense scheme, ciphertext-only: covariance eigenvectors of the shard
  aligned with those of public images (:func:`statistics_attack`).
* :mod:`~msd_fast.evaluation.audit.dense_known_plaintext` -- dense scheme: the key matrix from plain/cipher pairs
  (:func:`recover_block_matrix`).
* :func:`quick_audit` -- only the attacks that apply to one :class:`~msd_fast.protocol.encryption.EncryptionSpec`, one line
  each (``msd-fast audit --scheme dense``).
* :mod:`~msd_fast.evaluation.audit.metrics` -- PSNR, SSIM, direct / neighbour accuracy, chance levels.
"""
from .jigsaw import JigsawResult, jigsaw_attack
from .dense_known_plaintext import RecoveredBlockMatrix, recover_block_matrix
from .known_plaintext import RecoveredTables, recover_key_tables
from .metrics import direct_accuracy, neighbour_accuracy, psnr, ssim
from .quick import QuickAudit, quick_audit
from .report import AuditReport, run_audit
from .statistics_attack import StatisticsResult, statistics_attack

__all__ = ["AuditReport", "JigsawResult", "QuickAudit", "RecoveredBlockMatrix", "RecoveredTables", "StatisticsResult",
           "direct_accuracy", "jigsaw_attack", "neighbour_accuracy", "psnr", "quick_audit", "recover_block_matrix",
           "recover_key_tables", "run_audit", "ssim", "statistics_attack"]
