"""The ``msd-fast`` command line.

Every subcommand runs inside :func:`main`'s one error handler: a user error (a missing or foreign file, a corrupt
shard, a bad flag value, a backend that is not built here) prints one line ``msd-fast <command>: error: <message>``
on stderr and exits with status 2; ``--debug`` shows the traceback instead. A bug prints its traceback and says so
(status 1); Ctrl-C exits with status 130, SIGTERM with 143, and neither leaves a half-written file.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
import traceback
import warnings
from typing import Iterator

from ..atomic import Terminated, terminate_as_exit
from ..backends import BackendUnavailableError
from ..checks import check_command
from .paths import check_outputs

# What a user's input can cause. DataError and ShardError are ValueErrors; OSError covers missing, existing and
# unreadable files; AssertionError is how timm checks model arguments (e.g. a width not divisible by the heads);
# FloatingPointError is the trainer's "the loss diverged, lower --lr".
USER_ERRORS = (ValueError, OSError, AssertionError, FloatingPointError, BackendUnavailableError)


def _backends(args: argparse.Namespace) -> int:
    from ..backends import backends

    for status in backends().values():
        print(status)
    return 0


def _encrypt_demo(args: argparse.Namespace) -> int:
    from ..evaluation.encryption_demo import run

    run(out_dir=args.out, patch_size=args.patch_size, size=args.size, key_path=args.key)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from ..server import pretrain
    from ..server.config import from_args

    summary = pretrain(from_args(args))
    if summary["history"]:
        last = summary["history"][-1]
        print(f"pretrained {summary['epochs']} epochs ({summary['steps']} steps, {summary['processes']} process(es)): "
              f"final epoch loss {last['loss']:.4f}, {last['images_per_s']:.1f} images/s; "
              f"checkpoint {summary['checkpoint']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..server import export_backbone

    metadata = export_backbone(args.checkpoint, args.out, overwrite=args.force)
    print(f"exported {metadata['arch']} ({metadata['mode']} mode, patch {metadata['patch_size']}, "
          f"key fingerprint {metadata['key_fingerprint']}) to {args.out}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="msd-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    report = commands.add_parser("backends", help="which kernel backends are available here, and why not")
    report.set_defaults(run=_backends)
    demo = commands.add_parser("encrypt-demo", help="encrypt/decrypt synthetic scans and write a side-by-side PNG")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--patch-size", type=int, default=16, help="block size (default: 16)")
    demo.add_argument("--size", type=int, default=224,
                      help="image side, a multiple of the patch size, at most 8192 (default: 224)")
    demo.add_argument("--key", default=None, help="key file to use (default: a fresh key)")
    demo.set_defaults(run=_encrypt_demo, out_kind="folder")
    _add_client_parsers(commands)
    _add_pretrain_parsers(commands)
    _add_downstream_parsers(commands)
    _add_demo_parser(commands)
    _add_audit_parser(commands)
    for command in commands.choices.values():  # --debug also after the command; SUPPRESS keeps a global --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an error")
    return parser


def _add_demo_parser(commands) -> None:
    from ..evaluation.demo import add_demo_arguments, run_demo_command

    demo = commands.add_parser("demo", help="the whole pipeline and both baselines on simulated clients, with a "
                                            "report (the main command)")
    add_demo_arguments(demo)
    demo.set_defaults(run=run_demo_command, out_kind="folder")


def _add_audit_parser(commands) -> None:
    from ..evaluation.audit.report import add_audit_arguments, run_audit_command

    audit = commands.add_parser("audit", help="play the honest-but-curious server: attack encrypted data, report "
                                              "what it recovers next to chance (markdown, PNG, JSON)")
    add_audit_arguments(audit)
    audit.set_defaults(run=run_audit_command, out_kind="folder")


def _add_client_parsers(commands) -> None:
    from ..client.encode import add_encode_arguments, add_keygen_arguments, run_encode, run_keygen

    keygen = commands.add_parser("keygen", help="client: write a new consortium key (prints its fingerprint only)")
    add_keygen_arguments(keygen)
    keygen.set_defaults(run=run_keygen, out_kind="file")
    encode = commands.add_parser("encode", help="client: encrypt a dataset once into the shard to upload")
    add_encode_arguments(encode)
    encode.set_defaults(run=run_encode, out_kind="file")
    from ..client.timm_export import add_export_timm_arguments, run_export_timm

    export_timm = commands.add_parser("export-timm", help="client: write the decrypted model as a timm hub folder "
                                                          "(timm.create_model('local-dir:FOLDER'))")
    add_export_timm_arguments(export_timm)
    export_timm.set_defaults(run=run_export_timm)


def _add_pretrain_parsers(commands) -> None:
    from ..server.config import add_arguments

    pretrain = commands.add_parser("pretrain", help="server: masked sampling distillation on uploaded shards "
                                                    "(run under torchrun for several processes)")
    add_arguments(pretrain)
    pretrain.set_defaults(run=_pretrain, out_kind="folder")
    export = commands.add_parser("export", help="server: write the pretrained backbone as timm safetensors")
    export.add_argument("--checkpoint", required=True, help="a pretraining checkpoint.pt")
    export.add_argument("--out", required=True, help="the .safetensors file to write")
    export.add_argument("--force", action="store_true", help="replace an existing file")
    export.set_defaults(run=_export, out_kind="file")


def _add_downstream_parsers(commands) -> None:
    from .downstream import (add_fedavg_arguments, add_finetune_arguments, add_probe_arguments, run_fedavg,
                                 run_finetune, run_probe)

    for name, add, run, help_text in (
            ("finetune", add_finetune_arguments, run_finetune,
             "client: fine-tune the exported backbone (or the same ViT from random init) and evaluate it"),
            ("probe", add_probe_arguments, run_probe,
             "client: k-NN and linear probe on the frozen features of the backbone (or of random init)"),
            ("fedavg", add_fedavg_arguments, run_fedavg,
             "baseline: supervised FedAvg over simulated clients, with its communication")):
        parser = commands.add_parser(name, help=help_text)
        add(parser)
        parser.set_defaults(run=run, out_kind="folder")


def _one_line(error: BaseException) -> str:
    message = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def _as_flag(message: str, args: argparse.Namespace) -> str:
    """A message from a lower layer that starts with a setting's Python name (``batch_size must be ...``) names the
    command-line flag instead (``--batch-size must be ...``)."""
    match = re.match(r"([a-z][a-z0-9_]*)\b", message)
    if match and match[1] in vars(args) and match[1] not in ("run", "command", "out_kind", "debug"):
        return "--" + match[1].replace("_", "-") + message[match.end():]
    return message


def main(argv: list | None = None) -> int:
    """Parse ``argv``, check the command's outputs, run it; returns the exit status: 0, 2 on a user error (one line),
    1 on an internal error (the traceback, then a line saying it is a bug), 130 on Ctrl-C, 143 on SIGTERM -- in
    every case the files being written are removed, none is left half-written."""
    args = build_parser().parse_args(argv)
    try:
        with terminate_as_exit(), one_line_warnings(args.command):
            check_command(args)
            check_outputs(args)
            return args.run(args)
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
