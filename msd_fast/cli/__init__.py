"""The ``msd-fast`` command line: :func:`main` parses and runs one subcommand (:mod:`.main`); each side of the
protocol declares its commands next to the others (:mod:`.downstream` for fine-tuning, probes and FedAvg)."""
from .commands import build_parser, main

__all__ = ["build_parser", "main"]
