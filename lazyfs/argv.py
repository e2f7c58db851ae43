"""A frozen dataclass as a command line and back, each field spelled once (its name is its flag).

For the descriptions that travel to a detached process as arguments (lazyfs.fs.daemon.DaemonArgs,
lazyfs.source.spec.Source). Field types: str, int, float, bool (a flag), ``X | None`` (absent when
None), tuple[str, ...] (the flag repeated), and a nested dataclass of these (its fields inline).
A field whose metadata says ``{"argv": "positional"}`` is the one positional argument, after --.
Only values that differ from the field's default are written, so the command lines stay short.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)  # once per class: it evaluates every annotation


def _base(hint):
    """(type, optional) of a field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0], True
    return hint, False


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def to_argv(obj) -> list[str]:
    out: list[str] = []
    positional: list[str] = []
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += to_argv(value)
            continue
        if f.metadata.get("argv") == "positional":
            positional.append(str(value))
            continue
        if value is None or value == _default(f):
            continue  # None is absent: the parser gives back the default
        kind, _ = _base(hints[f.name])
        if kind is bool:
            out.append(_flag(f) if value else "--no-" + _flag(f)[2:])
        elif typing.get_origin(kind) is tuple:
            out += [f"{_flag(f)}={item}" for item in value]  # "=": a value may start with "-"
        else:
            out.append(f"{_flag(f)}={value}")
    return out + (["--", *positional] if positional else [])


class Parser(argparse.ArgumentParser):
    """argparse, except that an option's value may be "--". to_argv writes ``--flag=VALUE`` and
    a value is data, but argparse (3.11) drops a "--" it is given, even as ``--flag=--``."""

    def _get_values(self, action, arg_strings):
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            return self._get_value(action, "--")
        return super()._get_values(action, arg_strings)


def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        kind, _ = _base(hints[f.name])
        if dataclasses.is_dataclass(kind):
            add_arguments(kind, parser)
            continue
        if f.metadata.get("argv") == "positional":
            parser.add_argument(f.name)
            continue
        default = _default(f)
        required = default is dataclasses.MISSING
        if kind is bool:
            parser.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(_flag(f), dest=f.name, action="append", default=[])
        else:
            parser.add_argument(_flag(f), dest=f.name, type=kind if kind in (int, float) else str,
                                required=required, default=None if required else default)


def from_namespace(cls, ns: argparse.Namespace):
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        kind, _ = _base(hints[f.name])
        if dataclasses.is_dataclass(kind):
            values[f.name] = from_namespace(kind, ns)
        elif typing.get_origin(kind) is tuple:
            values[f.name] = tuple(getattr(ns, f.name))
        else:
            values[f.name] = getattr(ns, f.name)
    return cls(**values)
