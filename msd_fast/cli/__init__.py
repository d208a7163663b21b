"""The ``msd-fast`` command line: :func:`main` parses and runs one subcommand (:mod:`.commands`, the table of every
command); each command's config and run function live by role: :mod:`.client` (keygen, encode), :mod:`.server`
(pretrain, export), :mod:`.downstream` (finetune, probe, fedavg), :mod:`.demo` (demo, encrypt-demo),
:mod:`.audit`; :mod:`.flags` turns the config dataclasses into flags."""
from .commands import build_parser, main

__all__ = ["build_parser", "main"]
