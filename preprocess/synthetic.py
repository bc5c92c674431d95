"""``python -m preprocess.synthetic OUT_DIR [--config C] [--set benchmark.key=value ...] [--workers K]``: write the
built-in quality-shift benchmark (``hpcfl.data.builtin``) into a directory of its own, e.g. to inspect it or to
point ``data.source`` at it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpcfl.data.builtin import build
from hpcfl.errors import describe_os_error, exit_now


def main(argv=None) -> int:
    import argparse

    from hpcfl.config import ConfigError, load

    p = argparse.ArgumentParser(prog="python -m preprocess.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--config", type=Path, default=None, help="take [benchmark] from this TOML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="benchmark.KEY=VALUE")
    p.add_argument("--workers", type=int, default=1, help="processes rendering the images (same result; default 1)")
    args = p.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out_dir.exists():
        print(f"error: {args.out_dir} exists; choose a new directory", file=sys.stderr)
        return 2
    try:
        build(args.out_dir, cfg.benchmark, max(1, args.workers))
    except OSError as e:  # a full disk, a directory we may not write: nothing half-written is left
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        exit_now(2)
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
