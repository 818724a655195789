"""``python -m bpf --dump``: print the exact C (and flags) the loader compiles."""

from __future__ import annotations

import argparse
import sys

from bpf.loader import (
    DEFAULT_HBONE_PORT,
    DEFAULT_INBOUND_PORT,
    DEFAULT_OUTBOUND_PORT,
    BpfError,
    MeshBpf,
    cflags,
    check_environment,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpf", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--dump", action="store_true", help="print the C that gets compiled")
    action.add_argument("--check", action="store_true", help="compile, load and report")
    parser.add_argument("--outbound-port", type=int, default=DEFAULT_OUTBOUND_PORT)
    parser.add_argument("--inbound-port", type=int, default=DEFAULT_INBOUND_PORT)
    parser.add_argument("--hbone-port", type=int, default=DEFAULT_HBONE_PORT)
    args = parser.parse_args(argv)
    try:
        if args.dump:
            flags = cflags(args.outbound_port, args.inbound_port, args.hbone_port)
            sys.stdout.write(f"/* cflags: {' '.join(flags)} */\n{MeshBpf.source()}")
        else:
            check_environment()
            print("ok: the eBPF programs compile, load and can be attached here")
    except BpfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
