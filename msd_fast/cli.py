"""The ``msd-fast`` command line."""
from __future__ import annotations

import argparse
import sys


def _backends(args: argparse.Namespace) -> int:
    from .backends import backends

    for status in backends().values():
        print(status)
    return 0


def _encrypt_demo(args: argparse.Namespace) -> int:
    from .encryption_demo import run

    run(out_dir=args.out, patch_size=args.patch_size, size=args.size, key_path=args.key)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain
    from .pretrain.config import from_args

    summary = pretrain(from_args(args))
    if summary["history"]:
        last = summary["history"][-1]
        print(f"pretrained {summary['epochs']} epochs ({summary['steps']} steps, {summary['processes']} process(es)): "
              f"final epoch loss {last['loss']:.4f}, {last['images_per_s']:.1f} images/s; "
              f"checkpoint {summary['checkpoint']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .pretrain import export_backbone

    metadata = export_backbone(args.checkpoint, args.out, overwrite=args.force)
    print(f"exported {metadata['arch']} ({metadata['mode']} mode, patch {metadata['patch_size']}, "
          f"key fingerprint {metadata['key_fingerprint']}) to {args.out}")
    return 0


def _client_command(run):
    """A client subcommand: user errors (bad data, existing files, wrong arguments) end in one clear line, exit 2."""
    def command(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, OSError) as error:
            print(f"msd-fast {args.command}: error: {error}", file=sys.stderr)
            return 2
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msd-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("backends", help="which kernel backends are available here, and why not")
    report.set_defaults(run=_backends)
    demo = commands.add_parser("encrypt-demo", help="encrypt/decrypt synthetic scans and write a side-by-side PNG")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--patch-size", type=int, default=16)
    demo.add_argument("--size", type=int, default=224, help="image side, a multiple of the patch size")
    demo.add_argument("--key", default=None, help="key file to use (default: a fresh key)")
    demo.set_defaults(run=_encrypt_demo)
    _add_client_parsers(commands)
    _add_pretrain_parsers(commands)
    _add_demo_parser(commands)
    return parser


def _add_demo_parser(commands) -> None:
    from .demo import add_demo_arguments, run_demo_command

    demo = commands.add_parser("demo", help="the whole pipeline and both baselines on simulated clients, with a "
                                            "report (the main command)")
    add_demo_arguments(demo)
    demo.set_defaults(run=run_demo_command)


def _add_client_parsers(commands) -> None:
    from .client import add_encode_arguments, add_keygen_arguments, run_encode, run_keygen

    keygen = commands.add_parser("keygen", help="client: write a new consortium key (prints its fingerprint only)")
    add_keygen_arguments(keygen)
    keygen.set_defaults(run=_client_command(run_keygen))
    encode = commands.add_parser("encode", help="client: encrypt a dataset once into the shard to upload")
    add_encode_arguments(encode)
    encode.set_defaults(run=_client_command(run_encode))


def _add_pretrain_parsers(commands) -> None:
    from .pretrain.config import add_arguments

    pretrain = commands.add_parser("pretrain", help="server: masked sampling distillation on uploaded shards "
                                                    "(run under torchrun for several processes)")
    add_arguments(pretrain)
    pretrain.set_defaults(run=_pretrain)
    export = commands.add_parser("export", help="server: write the pretrained backbone as timm safetensors")
    export.add_argument("--checkpoint", required=True, help="a pretraining checkpoint.pt")
    export.add_argument("--out", required=True, help="the .safetensors file to write")
    export.add_argument("--force", action="store_true", help="replace an existing file")
    export.set_defaults(run=_export)


def main(argv: list | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
