"""config/gateway.example.toml documents every key and is itself a valid config."""

from __future__ import annotations

from pathlib import Path

import msgspec

from gateway.config import SECRET_KEYS, GatewayConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "gateway.example.toml"


def _keys(struct: type[msgspec.Struct]) -> set[str]:
    """Every field name of a config Struct, recursively (through dicts and tuples of Structs)."""
    names: set[str] = set()
    for field in msgspec.structs.fields(struct):
        names.add(field.name)
        for candidate in _struct_types(field.type):
            names |= _keys(candidate)
    return names


def _struct_types(annotation: object) -> list[type[msgspec.Struct]]:
    found: list[type[msgspec.Struct]] = []
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        found.append(annotation)
    for argument in getattr(annotation, "__args__", ()) or ():
        found.extend(_struct_types(argument))
    return found


class TestExampleConfig:
    """The commented example is complete and loads."""

    def test_it_loads(self) -> None:
        config = load_config(EXAMPLE.read_bytes(), {})
        assert {"shop"} == set(config.tenants)

    def test_every_key_is_documented(self) -> None:
        text = EXAMPLE.read_text()
        missing = sorted(name for name in _keys(GatewayConfig) if name not in text)
        assert [] == missing

    def test_secrets_are_only_mentioned_in_comments(self) -> None:
        for line in EXAMPLE.read_text().splitlines():
            if line.lstrip().startswith("#"):
                continue
            for secret in SECRET_KEYS:
                assert not line.strip().startswith(f"{secret} ="), line
