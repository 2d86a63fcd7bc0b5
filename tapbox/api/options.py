"""The Python API's keyword arguments -> RunOptions: the one place they are mapped.

How this works: `OPTION_FIELDS` says which RunOptions field each keyword sets (the CLI has the
same table for its flags, tapbox/cli/args.py). `run_options()` turns the keywords a call was
given into a `Layer` over the profiles it names (`profile=`) and over `options=` (a RunOptions
the caller built), and RunOptions.from_layers() validates the result, so a wrong value is the
same UsageError whichever front end gave it ("mtu= 70000: must be between 576 and 65520").

The filesystem keywords `write`, `read`, `hide` and `tmpfs` (paths, or one path) all become
`filesystem.paths` rules, in the order the keywords are given, and each list in its order
(later wins, as on the command line); a relative path is taken from the command's working
directory (`cwd=`, else the caller's), `~` is the caller's home, as on the command line.
`setenv` also takes a dict.

A keyword whose field this tapbox does not have yet is refused with a UsageError saying so:
an option that asks for more isolation is never dropped silently. When such a field lands,
only its row here changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

from tapbox.allowlist import API_SOURCE
from tapbox.errors import UsageError
from tapbox.options import (
    AllowRule,
    Layer,
    Origin,
    PathRule,
    RunOptions,
    part_fields,
    part_names,
)

# keyword -> the RunOptions field it sets ("part.name"). Lists may be given as any iterable, a
# single string or path where a list is expected stands for a list of one.
OPTION_FIELDS: dict[str, str] = {
    "allow": "network.allow",
    "allowlists": "network.allowlists",
    "network": "network.enabled",
    "dns_upstream": "network.dns_upstream",
    "mtu": "network.mtu",
    "ipv6": "network.ipv6",
    "fs": "filesystem.view",
    "write": "filesystem.paths",  # PathRule("write", PATH) each, in order
    "read": "filesystem.paths",
    "hide": "filesystem.paths",
    "tmpfs": "filesystem.paths",
    "root": "environment.root",
    "setenv": "environment.setenv",  # ["VAR=VALUE", ...] or {"VAR": "VALUE"}
    "unsetenv": "environment.unsetenv",
    "clearenv": "environment.clearenv",
    "log": "record.log",
    "log_limit": "record.log_limit",
    "pcap": "record.pcap",
    "pcap_limit": "record.pcap_limit",
    "learn": "record.learn",
    "audit": "record.audit",
    "report": "record.report",
    "verbose": "record.verbose",
    "syscalls": "process.syscalls",  # "default", "strict", "off"
    "syscall_allow": "process.syscall_allow",  # names and @groups
    "nest": "process.nest",
    "landlock": "process.landlock",
    "memory": "limits.memory",  # bytes
    "max_procs": "limits.max_procs",
    "max_files": "limits.max_files",
}
# limits.timeout has no keyword of its own: tapbox.run and tapbox.call have subprocess's
# timeout= (the sandbox killed, TimeoutExpired raised), and tapbox.enter's timeout= sets it.
ENTER_FIELDS = {**OPTION_FIELDS, "timeout": "limits.timeout"}

# The issue that brings a field this tapbox lacks, for the message refusing its keyword.
_COMING: dict[str, str] = {}
PATH_KEYWORDS = ("write", "read", "hide", "tmpfs")


def run_options(keywords: Mapping[str, Any], *, what: str = "tapbox.run",
                table: Mapping[str, str] = OPTION_FIELDS) -> RunOptions:
    """RunOptions from an API call's option keywords (OPTION_FIELDS, plus `options=` and
    `profile=`). Raises UsageError for an unknown keyword or a bad value, ProfileError for a
    profile that cannot be used."""
    keywords = dict(keywords)
    base = keywords.pop("options", None)
    profiles = _as_list(keywords.pop("profile", None))
    layers: list[Layer] = []
    if base is not None:
        if not isinstance(base, RunOptions):
            raise UsageError(f"options=: expected a RunOptions, got {type(base).__name__}")
        layers.append(_layer_of(base))
    if profiles:
        from tapbox.profile import load_profile

        layers.extend(load_profile(os.fspath(path)) for path in profiles)
    layer = Layer()
    paths: list[PathRule] = []
    for keyword, value in keywords.items():
        path = table.get(keyword)
        if path is None:
            raise UsageError(f"{what}() got an unexpected keyword argument {keyword!r}")
        part, name = path.split(".")
        if name not in part_fields(part):
            raise UsageError(f"{keyword}=: not supported by this tapbox yet (it comes with "
                             f"{_COMING.get(part, 'a later version')})", option=path)
        if keyword in PATH_KEYWORDS:
            paths.extend(_path_rules(keyword, value))
            continue
        layer.set(path, _convert(path, value), Origin(f"{keyword}="))
    if paths:
        names = "/".join(f"{k}=" for k in PATH_KEYWORDS if k in keywords)
        layer.set("filesystem.paths", tuple(paths), Origin(names))
    layers.append(layer)
    options = RunOptions.from_layers(*layers)
    if options.filesystem.view == "overlay":
        # The layer's review and commit are the tapbox command's (tapbox.runner.run); an API run
        # would have no layer to keep.
        raise UsageError("the copy-on-write view (fs='overlay') is not available from the Python "
                         "API yet: run `tapbox --fs overlay -- CMD`, then `tapbox changes` and "
                         "`tapbox commit`", option="filesystem.view")
    return options


def _path_rules(action: str, value: Any) -> list[PathRule]:
    rules = []
    for item in _as_list(value):
        if not isinstance(item, str | os.PathLike):
            raise UsageError(f"{action}=: expected paths, got {type(item).__name__}",
                             option="filesystem.paths")
        rules.append(PathRule(action, os.fsdecode(item)))  # (resolved by tapbox.isolate.rootfs)
    return rules


def _convert(path: str, value: Any) -> Any:
    """What the API accepts beyond the field's own type: any iterable for a list, a single
    string or path for a list of one, paths as os.PathLike."""
    from tapbox.options import field_type

    hint = str(field_type(path))
    if "tuple" not in hint:
        return os.fspath(value) if isinstance(value, os.PathLike) else value
    if path == "environment.setenv" and isinstance(value, Mapping):
        for name, setting in value.items():
            if not (isinstance(name, str) and isinstance(setting, str)):
                raise UsageError(f"setenv=: expected strings for names and values, got "
                                 f"{name!r}: {setting!r}", option=path)
        return tuple(f"{name}={setting}" for name, setting in value.items())
    items = _as_list(value)
    if path == "network.allow":
        return tuple(item if isinstance(item, AllowRule) else AllowRule(item, API_SOURCE)
                     if isinstance(item, str) else item for item in items)
    return tuple(os.fspath(item) if isinstance(item, os.PathLike) else item for item in items)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | bytes | os.PathLike):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        return list(value)
    return [value]  # validation names the wrong type


def _layer_of(options: RunOptions) -> Layer:
    """A RunOptions given whole, as the bottom layer (every field, as it is)."""
    layer = Layer()
    for part in part_names():
        values = getattr(options, part)
        for f in fields(values):
            layer.set(f"{part}.{f.name}", getattr(values, f.name), Origin(f"options.{part}."
                                                                           f"{f.name}"))
    return layer

