"""Profiles: a TOML file of tapbox options (`-p FILE`), read into an options `Layer`.

How this works: the file is parsed with the standard library's tomllib. Its tables are the parts
of RunOptions and its keys their fields (`[network]` / `mtu = 1500` is `network.mtu`), so the
schema is the options dataclasses themselves (docs/profiles.md lists it). Each value is turned
into the field's type the way the CLI turns text: a list field also takes a single string,
allowlist rules remember the profile line they were written on, a size may be written "100M",
and a relative path is made relative to the profile's own directory (`~` is the home
directory). The profile is then validated on its own, so a profile that is wrong is reported as
such wherever it is used; the caller stacks the layer under the command line's.

Every problem stops tapbox with `FILE:LINE: what is wrong` (a ProfileError): TOML syntax
(tomllib's message, with its line moved to the front), a table or key that does not exist, a
value of the wrong type or out of range, a rule or DNS upstream that does not parse. tomllib
keeps no positions for values it accepted; tapbox.tomllines finds each key's line.

A profile is only ever read because the user named it: nothing looks for one in the working
directory (a repository must not be able to widen its own sandbox).
"""

from __future__ import annotations

import os
import re
import tomllib
import typing
from collections.abc import Callable
from typing import Any

from tapbox.errors import AllowlistError, ProfileError, UsageError
from tapbox.options import (
    AllowRule,
    Layer,
    Origin,
    PathRule,
    RunOptions,
    field_type,
    part_fields,
    part_names,
)
from tapbox.tomllines import KeyPath, key_lines, line_of

_TOML_POSITION = re.compile(r"(.*) \(at (?:line ([0-9]+), column ([0-9]+)|end of document)\)",
                            re.DOTALL)


def load_profile(path: str) -> Layer:
    """Read the profile at `path`; raises ProfileError ("FILE:LINE: problem")."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ProfileError.at(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError.at(path, f"cannot read: not UTF-8 text (bad byte at offset "
                                    f"{exc.start})") from None
    return parse_profile(text, path)


def parse_profile(text: str, path: str) -> Layer:
    """The options `text` sets; `path` names the file in messages and anchors relative paths."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(exc, text, path) from None
    reader = _ProfileReader(path, key_lines(text))
    layer = reader.read(document)
    try:
        RunOptions.from_layers(layer)
    except UsageError as exc:
        raise ProfileError.at(exc.location or path, exc.problem) from None
    return layer


def _syntax_error(exc: tomllib.TOMLDecodeError, text: str, path: str) -> ProfileError:
    message = str(exc)
    match = _TOML_POSITION.fullmatch(message)
    if match is None:
        return ProfileError.at(path, f"not valid TOML: {message}")
    problem = match[1][:1].lower() + match[1][1:]
    if match[2] is None:  # at end of document
        line = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
        return ProfileError.at(f"{path}:{max(line, 1)}", f"not valid TOML: {problem} "
                                                         "(at the end of the file)")
    return ProfileError.at(f"{path}:{match[2]}", f"not valid TOML: {problem} "
                                                 f"(column {match[3]})")


class _ProfileReader:
    def __init__(self, path: str, lines: dict[KeyPath, int]) -> None:
        self.path = path
        self.lines = lines
        self.base = os.path.dirname(os.path.abspath(path))

    def where(self, key: KeyPath) -> str:
        return f"{self.path}:{line_of(self.lines, key)}"

    def error(self, key: KeyPath, problem: str) -> ProfileError:
        return ProfileError.at(self.where(key), problem)

    def read(self, document: dict[str, Any]) -> Layer:
        layer = Layer()
        parts = part_names()
        for part, table in document.items():
            if part not in parts:
                raise self.error((part,), _unknown(f"table [{part}]" if isinstance(table, dict)
                                                   else f"key {part!r}", part, parts))
            if not isinstance(table, dict):
                raise self.error((part,), f"{part} must be a table ([{part}]), not a value")
            known = part_fields(part)
            for name, value in table.items():
                if name not in known:
                    raise self.error((part, name), _unknown(f"key {name!r} in [{part}]", name,
                                                            list(known)))
                dotted = f"{part}.{name}"
                layer.set(dotted, self.convert(dotted, (part, name), value),
                          Origin(dotted, self.where((part, name))))
        return layer

    def convert(self, dotted: str, key: KeyPath, value: Any) -> Any:
        """The TOML value as the field's type; anything else is left for validate() to name."""
        metadata = part_fields(key[0])[str(key[1])].metadata
        hint = field_type(dotted)
        if typing.get_origin(hint) is tuple:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                return value
            return tuple(self.item(dotted, (*key, i), item, metadata)
                         for i, item in enumerate(value))
        if metadata.get("size") and isinstance(value, str):
            from tapbox.pcap import parse_size

            try:
                return parse_size(value)
            except ValueError as exc:
                raise self.error(key, f"{dotted}: {exc}") from None
        if metadata.get("duration") and isinstance(value, str):
            from tapbox.options import parse_duration

            try:
                return parse_duration(value)
            except ValueError as exc:
                raise self.error(key, f"{dotted}: {exc}") from None
        if metadata.get("path") and isinstance(value, str):
            return self.path_value(dotted, key, value)
        return value

    def item(self, dotted: str, key: KeyPath, item: Any, metadata: Any) -> Any:
        """One list item: a rule is checked now and remembers its line; a DNS upstream is
        checked now; a path, alone or in a filesystem rule ("write PATH"), is made absolute."""
        if not isinstance(item, str):
            return item
        if typing.get_args(field_type(dotted))[0] is AllowRule:
            from tapbox.allowlist import parse_rule

            source = self.where(key)
            try:
                parse_rule(item, source)
            except AllowlistError as exc:
                raise ProfileError.at(source, exc.problem) from None
            return AllowRule(item, source)
        if typing.get_args(field_type(dotted))[0] is PathRule:
            try:
                rule = PathRule.parse(item)
            except ValueError as exc:
                raise self.error(key, f"{dotted}: {exc}") from None
            return rule._replace(path=self.path_value(dotted, key, rule.path))
        check = _ITEM_CHECKS.get(dotted)
        if check is not None:
            try:
                check(item)
            except ValueError as exc:
                raise self.error(key, f"{dotted}: {exc}") from None
        if metadata.get("path"):
            return self.path_value(dotted, key, item)
        return item

    def path_value(self, dotted: str, key: KeyPath, value: str) -> str:
        if not value:
            raise self.error(key, f"{dotted}: empty path")
        return os.path.join(self.base, os.path.expanduser(value))


def _check_upstream(text: str) -> None:
    from tapbox.upstream import parse_upstream

    parse_upstream(text)


# Text a profile gives that is checked as it is read (the CLI's equivalents are checked when
# the run uses them): raise ValueError with the problem.
_ITEM_CHECKS: dict[str, Callable[[str], object]] = {"network.dns_upstream": _check_upstream}


def _unknown(what: str, name: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name.replace("-", "_"), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what}{hint}; known: {', '.join(known) or 'none yet'}"
