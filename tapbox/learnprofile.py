"""Learn mode writing a profile (`--learn FILE.toml`): the learned rules as `[network] allow`.

How this works: tapbox.learn decides what to learn, whatever the file's format; this module
knows the profile format (docs/profiles.md). A file whose name ends in `.toml` is a profile:

- read at the start (`existing_rules`): the rules it admits are its `network.allow` rules and
  the rules of its `network.allowlists` files, so that only what it does not admit yet is added;
- a new file (`new_profile`) is a `[network]` table whose `allow` array holds one learned rule
  per line, under the same comment header an allowlist gets;
- an existing file is merged (`merge_profile`), its text kept as it was: the learned rules go at
  the end of its `allow` array (found with tapbox.tomllines' tokens, so brackets and `#` inside
  strings and comments are no trap), or into a new `allow` array under its `[network]` header,
  or into a new `[network]` table at its end. The merged text is then read back as a profile;
  unless it parses and admits exactly the old rules plus the new ones, nothing is written
  (LearnError).

Every rule is written as a JSON-escaped string (valid TOML), every comment escaped
(tapbox.textescape): nothing the sandbox sent can end a string or a comment.
"""

from __future__ import annotations

import json

from tapbox.allowlist import Rule, load_file, parse_rule
from tapbox.errors import InputError, TapboxError
from tapbox.tomllines import _Token, _tokens

SUFFIX = ".toml"


class LearnError(Exception):
    """The learned rules cannot be merged into the profile (str(): why)."""


def is_profile(path: str) -> bool:
    return path.endswith(SUFFIX)


def existing_rules(text: str, path: str) -> list[Rule]:
    """The rules a profile admits (its allow rules and allowlist files); ProfileError or
    AllowlistError if it cannot be used."""
    from tapbox.profile import parse_profile

    layer = parse_profile(text, path)
    rules = [parse_rule(rule.text, rule.source) for rule in layer.values.get("network.allow", ())]
    for name in layer.values.get("network.allowlists", ()):
        rules.extend(load_file(name))
    return rules


def _item(text: str, comment: str) -> str:
    return f"    {json.dumps(text)}," + (f"  # {comment}" if comment else "")


def new_profile(header: list[str], rules: list[tuple[str, str]], notes: list[str]) -> str:
    """A profile of the learned `rules` ((text, comment) pairs); `notes`: comment lines."""
    lines = [*header, "", "[network]", "allow = ["]
    lines += [_item(text, comment) for text, comment in rules]
    lines.append("]")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def merge_profile(text: str, path: str, heading: str, rules: list[tuple[str, str]],
                  notes: list[str]) -> str:
    """`text` with `rules` added to its network.allow (see the module comment)."""
    block = [f"    # {heading}", *(_item(t, c) for t, c in rules),
             *(f"    {note}" for note in notes)]
    tokens = list(_tokens(text))
    span = _allow_array(tokens)
    if span is not None:
        comma, close = span
        head = text[:close] if comma is None else text[:comma] + "," + text[comma:close]
        merged = head.rstrip() + "\n" + "\n".join(block) + "\n" + text[close:]
    elif (header := _network_header(tokens)) is not None:
        end = text.find("\n", header)
        end = len(text) if end < 0 else end + 1
        merged = text[:end] + "allow = [\n" + "\n".join(block) + "\n]\n" + text[end:]
    else:
        tail = "" if not text or text.endswith("\n") else "\n"
        merged = text + tail + "\n[network]\nallow = [\n" + "\n".join(block) + "\n]\n"
    _verify(text, merged, path, [t for t, _ in rules])
    return merged


def _verify(old: str, merged: str, path: str, added: list[str]) -> None:
    from tapbox.profile import parse_profile

    try:
        before = [r.text for r in parse_profile(old, path).values.get("network.allow", ())]
        after = [r.text for r in parse_profile(merged, path).values.get("network.allow", ())]
    except (InputError, TapboxError) as exc:
        raise LearnError(f"the merged profile does not read back ({exc})") from None
    if after != before + added:
        raise LearnError("its network.allow could not be extended in place (write it as one "
                         "array under a [network] table)")


def _allow_array(tokens: list[_Token]) -> tuple[int | None, int] | None:
    """_array_end() of the `allow` array of [network], or None if there is none written as
    an array."""
    table: list[str] = []
    i = 0
    at_line_start = True
    while i < len(tokens):
        token = tokens[i]
        if token.kind == "nl":
            at_line_start = True
            i += 1
            continue
        if at_line_start and token.kind == "[":
            j, name = i + 1, []
            while j < len(tokens) and tokens[j].kind != "]":
                if tokens[j].kind in ("bare", "str"):
                    name.append(_key(tokens[j]))
                j += 1
            table = name
            i = j + 1
            at_line_start = False
            continue
        if at_line_start and token.kind in ("bare", "str"):
            key, j = [_key(token)], i + 1
            while j + 1 < len(tokens) and tokens[j].kind == ".":
                key.append(_key(tokens[j + 1]))
                j += 2
            if table + key == ["network", "allow"] and j + 1 < len(tokens) \
                    and tokens[j].kind == "=":
                if tokens[j + 1].kind != "[":
                    return None
                return _array_end(tokens, j + 1)
        at_line_start = False
        i += 1
    return None


def _array_end(tokens: list[_Token], start: int) -> tuple[int | None, int] | None:
    """(where a comma must go before more items, or None if none is needed; the offset of the
    closing `]`) of the array whose `[` is tokens[start]."""
    depth = 0
    previous: _Token | None = None
    for token in tokens[start:]:
        if token.kind == "nl":
            continue
        if token.kind in ("[", "{"):
            depth += 1
        elif token.kind in ("]", "}"):
            depth -= 1
            if depth == 0:
                assert previous is not None
                if previous.kind in (",", "["):
                    return None, token.start
                return previous.start + len(previous.text), token.start
        previous = token
    return None


def _network_header(tokens: list[_Token]) -> int | None:
    """The offset of a `[network]` header line, or None."""
    for i in range(len(tokens) - 2):
        first = i == 0 or tokens[i - 1].kind == "nl"
        if first and tokens[i].kind == "[" and _key(tokens[i + 1]) == "network" \
                and tokens[i + 2].kind == "]":
            return tokens[i].start
    return None


def _key(token: _Token) -> str:
    if token.kind == "str" and token.text[:1] in "\"'":
        import tomllib

        try:
            return str(tomllib.loads(f"k = {token.text}")["k"])
        except tomllib.TOMLDecodeError:
            return token.text
    return token.text
