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
    return parser


def main(argv: list | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
