"""The ``msd-fast`` command line.

Every subcommand runs inside :func:`main`'s one error handler: a user error (a missing or foreign file, a corrupt
shard, a bad flag value, a backend that is not built here) prints one line ``msd-fast <command>: error: <message>``
on stderr and exits with status 2; ``--debug`` shows the traceback instead. A bug prints its traceback and says so
(status 1); Ctrl-C exits with status 130, SIGTERM with 143, and neither leaves a half-written file.

Every subcommand is declared the same way, as one :class:`Command` of :func:`command_table`: a config dataclass
whose fields are its flags (:mod:`msd_fast.cli.flags`; its ``__post_init__`` checks the values, naming the flag)
and a function that runs it on that config.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
import traceback
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional

from ..atomic import Terminated, terminate_as_exit
from ..backends import BackendUnavailableError
from ..checks import check_command
from .flags import add_dataclass_arguments, dataclass_from_args
from .paths import check_outputs

# What a user's input can cause. DataError and ShardError are ValueErrors; OSError covers missing, existing and
# unreadable files; AssertionError is how timm checks model arguments (e.g. a width not divisible by the heads);
# FloatingPointError is the trainer's "the loss diverged, lower --lr".
USER_ERRORS = (ValueError, OSError, AssertionError, FloatingPointError, BackendUnavailableError)


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its name and one-line help, the config dataclass whose fields are its flags
    (:mod:`.flags`), the function that runs it on that config (returns the exit status) and what its ``--out``
    must be (``"folder"``, ``"file"`` or None), checked before any work (:mod:`.paths`)."""

    name: str
    help: str
    config: type
    run: Callable[[Any], int]
    out_kind: Optional[str] = None


@dataclasses.dataclass
class BackendsConfig:
    """``msd-fast backends`` has no settings."""


def _backends(config: BackendsConfig) -> int:
    from ..backends import backends

    for status in backends().values():
        print(status)
    return 0


def command_table() -> tuple[Command, ...]:
    """Every subcommand, in the order ``--help`` lists them."""
    from ..evaluation.demo import DemoConfig
    from ..server.config import PretrainConfig
    from .audit import AuditConfig, run_audit
    from .client import EncodeConfig, ExportTimmConfig, KeygenConfig, run_encode, run_export_timm, run_keygen
    from .demo import EncryptDemoConfig, run_demo, run_encrypt_demo
    from .downstream import FedAvgConfig, FinetuneConfig, ProbeConfig, run_fedavg, run_finetune, run_probe
    from .server import ExportConfig, run_export, run_pretrain

    return (
        Command("backends", "which kernel backends are available here, and why not", BackendsConfig, _backends),
        Command("encrypt-demo", "encrypt/decrypt synthetic scans and write a side-by-side PNG", EncryptDemoConfig,
                run_encrypt_demo, "folder"),
        Command("keygen", "client: write a new consortium key (prints its fingerprint only)", KeygenConfig,
                run_keygen, "file"),
        Command("encode", "client: encrypt a dataset once into the shard to upload", EncodeConfig, run_encode,
                "shards"),
        Command("pretrain", "server: masked sampling distillation on uploaded shards (run under torchrun for "
                            "several processes)", PretrainConfig, run_pretrain, "folder"),
        Command("export", "server: write the pretrained backbone as timm safetensors", ExportConfig, run_export,
                "file"),
        Command("export-timm", "client: write the decrypted model as a timm hub folder "
                               "(timm.create_model('local-dir:FOLDER'))", ExportTimmConfig, run_export_timm),
        Command("finetune", "client: fine-tune the exported backbone (or the same ViT from random init) and evaluate "
                            "it", FinetuneConfig, run_finetune, "folder"),
        Command("probe", "client: k-NN and linear probe on the frozen features of the backbone (or of random init)",
                ProbeConfig, run_probe, "folder"),
        Command("fedavg", "baseline: supervised FedAvg over simulated clients, with its communication", FedAvgConfig,
                run_fedavg, "folder"),
        Command("demo", "the whole pipeline and both baselines on simulated clients, with a report (the main "
                        "command)", DemoConfig, run_demo, "folder"),
        Command("audit", "play the honest-but-curious server: attack encrypted data, report what it recovers next "
                         "to chance (markdown, PNG, JSON)", AuditConfig, run_audit, "folder"),
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse's own refusals (an unknown flag, a value of the wrong type, a bad choice) as one line and exit status 2,
    like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Warnings print as ``msd-fast <command>: warning: <message>``, one line, without a source excerpt."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"msd-fast {command}: warning: {_one_line(message)}", file=sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def build_parser(commands: Optional[Iterable[Command]] = None) -> argparse.ArgumentParser:
    """The ``msd-fast`` parser: one subparser per :class:`Command` (default: :func:`command_table`), its flags from
    the command's config dataclass."""
    parser = OneLineParser(prog="msd-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for command in command_table() if commands is None else commands:
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        add_dataclass_arguments(subparser, command.config)
        # --debug also after the command; SUPPRESS keeps a global --debug
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show the full traceback of an error")
    return parser


def _one_line(error: BaseException) -> str:
    message = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def _as_flag(message: str, args: argparse.Namespace) -> str:
    """A message from a lower layer that starts with a setting's Python name (``batch_size must be ...``) names the
    command-line flag instead (``--batch-size must be ...``)."""
    match = re.match(r"([a-z][a-z0-9_]*)\b", message)
    if match and match[1] in vars(args) and match[1] not in ("command", "debug"):
        return "--" + match[1].replace("_", "-") + message[match.end():]
    return message


def main(argv: list | None = None) -> int:
    """Parse ``argv``, build the command's config (every setting checked), check its ``--device`` and ``--out``, run
    it; returns the exit status: 0, 2 on a user error (one line),
    1 on an internal error (the traceback, then a line saying it is a bug), 130 on Ctrl-C, 143 on SIGTERM -- in
    every case the files being written are removed, none is left half-written."""
    commands = {command.name: command for command in command_table()}
    args = build_parser(commands.values()).parse_args(argv)
    command = commands[args.command]
    try:
        with terminate_as_exit(), one_line_warnings(args.command):
            config = dataclass_from_args(command.config, args)  # its __post_init__ checks every setting
            check_command(config)
            check_outputs(config, command.out_kind)
            return command.run(config)
    except Terminated as signal_exit:
        print(f"msd-fast {args.command}: terminated", file=sys.stderr)
        return signal_exit.code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"msd-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"msd-fast {args.command}: error: {_as_flag(_one_line(error), args)}", file=sys.stderr)
        return 2
    except Exception:  # not the user's input: a bug of ours, shown in full
        if args.debug:
            raise
        traceback.print_exc()
        print(f"msd-fast {args.command}: internal error (a bug in msd_fast, not in your input; please report it with "
              f"the traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
