"""``clcalib`` command line. (Minimal version by the service work: the service subcommands;
the library's calibrate/evaluate subcommands are merged in by the library issue.)"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clcalib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    try:
        from service.cli import add_commands
    except ImportError as e:  # the library installed without the service
        print(f"(service commands unavailable: {e})", file=sys.stderr)
    else:
        add_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
