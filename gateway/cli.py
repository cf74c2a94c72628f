"""The ``cascadegw`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.config import GatewayConfig, load_config
from gateway.core.errors import ConfigError

DEFAULT_CONFIG = "config/gateway.toml"


def _load(path: str) -> GatewayConfig:
    return load_config(Path(path).read_bytes(), os.environ)


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    tenants = ", ".join(sorted(config.tenants)) or "none"
    providers = ", ".join(f"{n} ({p.kind})" for n, p in sorted(config.providers.items()))
    print(f"{args.config}: ok")
    print(
        f"  store: {config.store.backend} at {config.store.path} (synchronous={config.store.synchronous})"
    )
    print(f"  tenants: {tenants}")
    print(f"  providers: {providers or 'none'}")
    return 0


def _cmd_schema(_: argparse.Namespace) -> int:
    from gateway.protocol import json_schema

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascadegw", description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config file")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate the config and summarise it")
    check.set_defaults(func=_cmd_check_config)
    schema = commands.add_parser("schema", help="print the wire protocol's JSON Schema")
    schema.set_defaults(func=_cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"cascadegw: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"cascadegw: {exc.filename}: no such file", file=sys.stderr)
        return 2
    return result
