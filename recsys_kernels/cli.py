"""`recsys-kernels info | demo [...] | compress [...] | bench [...]`."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="recsys-kernels", description=__doc__)
    commands = ("info", "demo", "compress", "bench")
    parser.add_argument("command", choices=commands)
    # the command is the first word, and everything after it is the command's (so that
    # `demo --help` is the demo's help, not this one)
    if argv and argv[0] in commands:
        args, rest = argparse.Namespace(command=argv[0]), argv[1:]
    else:
        args, rest = parser.parse_args(argv[:1]), []
    if args.command == "info":
        from ._info import format_info

        print(format_info())
        return 0
    if args.command == "demo":
        from . import demo

        return demo.main(rest)
    if args.command == "compress":
        from .compress import cli as compress_cli

        return compress_cli.main(rest)
    # bench: the pytest-benchmark suite lives in the source tree, next to the package
    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if not os.path.isdir(bench_dir):
        print("recsys-kernels bench: the bench/ folder of a source checkout is needed", file=sys.stderr)
        return 2
    import pytest

    return pytest.main([bench_dir, "-q", *rest])


if __name__ == "__main__":
    sys.exit(main())
