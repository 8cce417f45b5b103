"""Write `deploy/envoy/envoy.yaml` for other replica addresses and ports.

    python -m deploy.envoy.render 10.0.0.5:8000 10.0.0.6:8000 --listen 0.0.0.0:8000 -o envoy.yaml

Only the addresses change: routing, health checks, retries and timeouts stay as `envoy.yaml`
sets and documents them.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

TEMPLATE = Path(__file__).with_name("envoy.yaml")


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` as a pair; the port must be a number from 1 to 65535."""
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


def _socket(address: tuple[str, int]) -> dict[str, Any]:
    return {"socket_address": {"address": address[0], "port_value": address[1]}}


def render(
    replicas: list[tuple[str, int]],
    listen: tuple[str, int] = ("127.0.0.1", 8000),
    admin: tuple[str, int] = ("127.0.0.1", 9901),
) -> dict[str, Any]:
    """The Envoy bootstrap of `envoy.yaml` with these replicas, listener and admin addresses."""
    if not replicas:
        raise ValueError("at least one replica is needed")
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(TEMPLATE.read_text()))
    config["admin"]["address"] = _socket(admin)
    (listener,) = config["static_resources"]["listeners"]
    listener["address"] = _socket(listen)
    (cluster,) = config["static_resources"]["clusters"]
    cluster["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": {"address": _socket(replica)}} for replica in replicas]}
    ]
    return config


def dump(config: dict[str, Any]) -> str:
    """YAML text of a rendered config, headed by where it came from."""
    header = "# Rendered by `python -m deploy.envoy.render` from deploy/envoy/envoy.yaml.\n"
    return header + yaml.safe_dump(config, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> None:
    """Command line: replica addresses in, Envoy config out (stdout or --output)."""
    parser = argparse.ArgumentParser(prog="python -m deploy.envoy.render", description=__doc__)
    parser.add_argument("replicas", nargs="+", type=parse_address, help="replica host:port")
    parser.add_argument("--listen", type=parse_address, default=("127.0.0.1", 8000))
    parser.add_argument("--admin", type=parse_address, default=("127.0.0.1", 9901))
    parser.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    text = dump(render(args.replicas, args.listen, args.admin))
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
