"""``python -m livemig.network``: run one host's vswitch (see ``livemig.network.api`` for its REST API)."""

from __future__ import annotations

import argparse
import logging

from livemig.network.api import run_vswitch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m livemig.network", description="livemig VCN vswitch")
    parser.add_argument("--host-name", required=True, help="this host's name in the mapping")
    parser.add_argument("--api", default="127.0.0.1:7480", help="REST API listen address host:port")
    parser.add_argument(
        "--overlay", default="127.0.0.1:4789", help="VXLAN overlay listen address ip:port (port 0: any free port)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_vswitch(args.host_name, args.api, args.overlay, log_level=args.log_level)


if __name__ == "__main__":
    main()
