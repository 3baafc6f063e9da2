"""``python -m livemig.storage``: run blockd (NBD volumes with write fencing + admin API)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from livemig.errors import LivemigError
from livemig.storage.service import DEFAULT_API_LISTEN, DEFAULT_NBD_LISTEN, run_blockd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m livemig.storage", description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True, help="volumes and metadata live here")
    parser.add_argument("--listen", default=DEFAULT_API_LISTEN, help="admin API address (host:port)")
    parser.add_argument("--nbd-listen", default=DEFAULT_NBD_LISTEN, help="NBD address (host:port)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_blockd(args.data_dir, args.listen, args.nbd_listen)
    except LivemigError as exc:
        print(f"blockd: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
