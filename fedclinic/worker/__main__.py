"""``python -m fedclinic.worker --config hospital.toml``: run one hospital's site worker.

Exit status: 0 after SIGTERM/Ctrl-C, 2 for a bad config or when another worker already
serves the state dir (one ``error:`` line each), 1 for anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedclinic.errors import FedClinicError
from fedclinic.local.configs import load_hospital_files
from fedclinic.local.federation import Interrupted, signals_as_exceptions
from fedclinic.worker.executor import check_flower
from fedclinic.worker.server import SiteWorker

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedclinic.worker",
        description="A hospital's site worker: answers its ClientApp's messages over a socket "
        "in the state dir, with torch and the data loaded once.",
    )
    parser.add_argument(
        "--config", type=Path, required=True, metavar="FILE.toml",
        help="the hospital config the SuperNode is started with (--node-config)",
    )  # fmt: skip
    parser.add_argument(
        "--runtime-api-address", metavar="HOST:PORT", default="",
        help="take the messages straight from this SuperNode's Runtime API (the node started "
        "with --isolation process); without it, answer the forwarder ClientApp's connections",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        spec = load_hospital_files([args.config])[0]
    except FedClinicError as err:
        _error(str(err))
        return EXIT_CONFIG
    worker = SiteWorker(spec.flat)
    if args.runtime_api_address:
        try:
            check_flower()
        except FedClinicError as err:
            _error(str(err))
            return EXIT_CONFIG
    with signals_as_exceptions():
        try:
            worker.open()
        except FedClinicError as err:
            _error(str(err))
            return EXIT_CONFIG
        except OSError as err:
            _error(f"hospital {worker.name}: cannot listen on {worker.socket_path}: {err}")
            return EXIT_FAILED
        try:
            tasks = f" and the node's tasks at {args.runtime_api_address}"
            print(
                f"fedclinic worker {worker.name}: serving {worker.socket_path}"
                f"{tasks if args.runtime_api_address else ''} (pid {os.getpid()})",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            worker.serve(args.runtime_api_address or None)
        except Interrupted as stop:
            print(
                f"fedclinic worker {worker.name}: stopped ({stop}) after "
                f"{worker.answered} message(s)",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        finally:
            worker.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
