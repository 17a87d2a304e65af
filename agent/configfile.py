"""TOML configuration files -> frozen dataclasses, shared by the three programs.

The machinery only: each program declares its sections as dataclasses whose
fields are made with :func:`option` (help text, bounds, choices), and
:func:`parse_tables` validates TOML text against them. Every error is a
:class:`ConfigError` naming the file, the section and the key on one line;
only the command-line entry points turn it into an exit status.

Relative paths resolve against the folder of the config file, never the
working directory (a daemon runs in ``/``).

Unknown keys are refused, so removing an option would stop every config file
that still sets it. A section retires an option instead: it names the key
and why in its ``RETIRED`` class attribute (``{key: why}``); the parser then
accepts the key with any value and ignores it, and the reference lists it as
retired.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


class ConfigError(Exception):
    """Invalid configuration. ``str(err)`` is one line naming file, section and key."""

    def __init__(self, file: Path | str, section: str, key: str, problem: str) -> None:
        where = f"[{section}] {key}" if key else f"[{section}]" if section else ""
        super().__init__(f"{file}: {where}: {problem}" if where else f"{file}: {problem}")
        self.file = str(file)
        self.section = section
        self.key = key
        self.problem = problem


def option(
    default: Any,
    help: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field with its help text and bounds (see the parser)."""
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=functools.partial(list, default), metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=functools.partial(dict, default), metadata=meta)
    return field(default=default, metadata=meta)


def read_text(p: Path) -> str:
    """A config file's text, or ConfigError naming it."""
    try:
        return p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(p, "", "", "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(p, "", "", f"cannot read: {_reason(e)}") from None


def parse_tables(text: str, path: Path, sections: Mapping[str, type]) -> dict[str, Any]:
    """TOML text -> validated section dataclasses, by name (ConfigError naming the key)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", "", f"not valid TOML: {e}") from None
    base = path.resolve().parent
    values: dict[str, Any] = {}
    for name, raw in data.items():
        if name not in sections:
            raise ConfigError(path, name, "", f"unknown section (known: {', '.join(sections)})")
        if not isinstance(raw, dict):
            raise ConfigError(path, name, "", "must be a table ([section])")
        values[name] = _section(sections[name], raw, path, name, base)
    return values


def _retired(cls: type) -> Mapping[str, str]:
    """The options ``cls`` retired: key -> why (accepted, ignored)."""
    retired: Mapping[str, str] = getattr(cls, "RETIRED", {})
    return retired


def _section(cls: type, raw: Mapping[str, Any], file: Path, section: str, base: Path) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    retired = _retired(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in retired and key not in known:
            continue  # an option that no longer does anything: old files still load
        if key not in known:
            raise ConfigError(
                file, section, key, f"unknown key (known: {', '.join(sorted(known))})"
            )
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(file, f"{section}.{key}", "", "must be a table")
            kwargs[key] = _section(typ, value, file, f"{section}.{key}", base)  # type: ignore[arg-type]
            continue
        kwargs[key] = _value(typ, value, known[key].metadata, file, section, key, base)
    # Relative default paths (for example jobs.state_dir = "state") also
    # resolve against the config folder.
    for name, f in known.items():
        if name in kwargs:
            continue
        if hints[name] in (Path,) and isinstance(f.default, Path) and not f.default.is_absolute():
            kwargs[name] = base / f.default
    return cls(**kwargs)


def _value(
    typ: Any, value: Any, meta: Mapping[str, Any], file: Path, section: str, key: str, base: Path
) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(file, section, key, f"expected {expected}, got {value!r}")

    optional = _is_optional(typ)
    inner = _strip_optional(typ)
    if inner is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        _check_range(value, meta, file, section, key)
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        _check_range(float(value), meta, file, section, key)
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise bad("a string")
        if "\x00" in value:
            raise ConfigError(file, section, key, "must not contain NUL")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(
                file, section, key, f"must be one of {', '.join(choices)}, got {value!r}"
            )
        return value
    if inner is Path:
        if not isinstance(value, str):
            raise bad("a path string")
        if value == "":
            if optional:
                return None
            raise ConfigError(file, section, key, "must not be empty")
        if "\x00" in value:
            raise ConfigError(file, section, key, "must not contain NUL")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    if typing.get_origin(inner) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        for v in value:
            if not v or "\x00" in v:
                raise ConfigError(file, section, key, f"invalid entry {v!r}")
        return list(value)
    if typing.get_origin(inner) is dict:
        # A table of strings (an inline table, such as labels = {role = "web"}).
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise bad("a table of strings")
        for k, v in value.items():
            if "\x00" in k or "\x00" in v:
                raise ConfigError(file, section, key, f"invalid entry {k!r}")
        return dict(value)
    raise AssertionError(f"unsupported config type {typ!r}")  # pragma: no cover


def _is_optional(typ: Any) -> bool:
    union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(typ)


def _strip_optional(typ: Any) -> Any:
    if _is_optional(typ):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0]
    return typ


def _check_range(value: float, meta: Mapping[str, Any], file: Path, section: str, key: str) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and value < lo:
        raise ConfigError(file, section, key, f"must be at least {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise ConfigError(file, section, key, f"must be at most {hi:g}, got {value:g}")


def split_host_port(addr: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; raise ValueError with a reason."""
    if addr.startswith("["):
        host, sep, rest = addr[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("expected [ipv6]:port")
        port_s = rest[1:]
    else:
        host, sep, port_s = addr.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets: [::1]:port")
    if not host:
        raise ValueError("host is empty")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"bad port {port_s!r}")
    return host, int(port_s)


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost' (nothing is resolved)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _fmt_default(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Path):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def describe_sections(sections: Mapping[str, type]) -> list[tuple[str, str, str, str]]:
    """Rows (section, key, default, help) for documentation."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(cls: type, section: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            if dataclasses.is_dataclass(typ):
                walk(typ, f"{section}.{f.name}")  # type: ignore[arg-type]
                continue
            default: Any = f.default
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            rows.append((section, f.name, _fmt_default(default), f.metadata.get("help", "")))
        for key, why in _retired(cls).items():
            rows.append((section, key, "", f"retired, accepted and ignored: {why}"))

    for name, cls in sections.items():
        walk(cls, name)
    return rows
