"""Where each key of a TOML document is written: its line number, for `file:line` messages.

How this works: the standard library's tomllib parses a document but keeps no positions, so a
profile whose `mtu = "big"` is valid TOML but a wrong value could not say on which line it is.
`key_lines(text)` reads the document again, for positions only, and maps every key path to the
line it is defined on: ("network",) for a `[network]` header (or the first dotted key or inline
table that creates it), ("network", "mtu") for `mtu = ...` under it, ("network", "allow", 2) for
the third item of an array. Array-of-tables entries are numbered the same way: ("x", 0) for the
first `[[x]]`.

It runs only on text tomllib has accepted, so it need not report errors: it splits the text into
tokens (strings of the four kinds, with their escapes and line breaks; comments; brackets,
braces, `=`, `,`, `.`; bare words), then follows the grammar of tables, keys and values just far
enough to know which key each token belongs to. Values are skipped, except arrays and inline
tables, whose items are followed. If anything unexpected turns up, it stops and returns what it
has found; callers fall back to the nearest enclosing key's line.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass

KeyPath = tuple[str | int, ...]

_PUNCTUATION = "[]{}=,."
_BARE_END = set(_PUNCTUATION) | set(" \t\r\n#\"'")


@dataclass(frozen=True)
class _Token:
    kind: str  # "str" (a quoted string), "bare", "nl", or one punctuation character
    text: str
    line: int
    start: int  # offset in the document, to tell `[[` from `[ [`


def key_lines(text: str) -> dict[KeyPath, int]:
    """Key path -> line number (1-based) of every key, table and array item in `text`."""
    lines: dict[KeyPath, int] = {}
    try:
        _Reader(list(_tokens(text)), lines).document()
    except (IndexError, ValueError, RecursionError, tomllib.TOMLDecodeError):
        pass  # not the TOML this was written for: keep what was found
    return lines


def line_of(lines: dict[KeyPath, int], path: KeyPath) -> int:
    """The line of `path`, or of the nearest enclosing key that has one (1 if none)."""
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return 1


def _tokens(text: str) -> Iterator[_Token]:
    i, line, end = 0, 1, len(text)
    while i < end:
        c = text[i]
        if c in " \t\r":
            i += 1
        elif c == "\n":
            yield _Token("nl", c, line, i)
            line += 1
            i += 1
        elif c == "#":
            while i < end and text[i] != "\n":
                i += 1
        elif c in "\"'":
            j = _string_end(text, i)
            yield _Token("str", text[i:j], line, i)
            line += text.count("\n", i, j)
            i = j
        elif c in _PUNCTUATION:
            yield _Token(c, c, line, i)
            i += 1
        else:
            j = i
            while j < end and text[j] not in _BARE_END:
                j += 1
            yield _Token("bare", text[i:j], line, i)
            i = j


def _string_end(text: str, i: int) -> int:
    """The offset just past the string that starts at text[i] (a quote)."""
    quote = text[i]
    escapes = quote == '"'  # literal strings ('...') have no escapes
    if text.startswith(quote * 3, i):
        j = i + 3
        while not text.startswith(quote * 3, j):
            j += 2 if escapes and text[j] == "\\" else 1
            if j >= len(text):
                raise ValueError("unterminated string")
        j += 3
        extra = 0  # up to two quotes right before the closing three belong to the string
        while extra < 2 and j < len(text) and text[j] == quote:
            j, extra = j + 1, extra + 1
        return j
    j = i + 1
    while text[j] != quote:
        j += 2 if escapes and text[j] == "\\" else 1
    return j + 1


class _Reader:
    """Follows tables, keys and values over the tokens, noting each key's line."""

    def __init__(self, tokens: list[_Token], lines: dict[KeyPath, int]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.lines = lines
        self.table_arrays: dict[KeyPath, int] = {}  # [[x]] seen so far: how many

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, kind: str | None = None) -> _Token:
        token = self.tokens[self.pos]
        if kind is not None and token.kind != kind:
            raise ValueError(f"expected {kind}, found {token.text!r}")
        self.pos += 1
        return token

    def skip_newlines(self) -> None:
        while (token := self.peek()) is not None and token.kind == "nl":
            self.pos += 1

    def note(self, path: KeyPath, line: int) -> None:
        self.lines.setdefault(path, line)

    def document(self) -> None:
        table: KeyPath = ()
        while True:
            self.skip_newlines()
            token = self.peek()
            if token is None:
                return
            if token.kind == "[":
                table = self.header()
            else:
                self.key_value(table)
                token = self.peek()
                if token is not None and token.kind != "nl":
                    raise ValueError(f"unexpected {token.text!r} after a value")

    def header(self) -> KeyPath:
        first = self.take("[")
        after = self.peek()
        array = after is not None and after.kind == "[" and after.start == first.start + 1
        if array:
            self.take("[")
        path = self.key()
        self.take("]")
        if array:
            self.take("]")
            index = self.table_arrays.get(path, 0)
            self.table_arrays[path] = index + 1
            self.note_prefixes(path, first.line)
            path = (*path, index)
        self.note_prefixes(path, first.line)
        return path

    def note_prefixes(self, path: KeyPath, line: int) -> None:
        for length in range(1, len(path) + 1):
            self.note(path[:length], line)

    def key(self) -> tuple[str, ...]:
        parts = [self.key_part()]
        while (token := self.peek()) is not None and token.kind == ".":
            self.take(".")
            parts.append(self.key_part())
        return tuple(parts)

    def key_part(self) -> str:
        token = self.take()
        if token.kind == "bare":
            return token.text
        if token.kind == "str":
            value = tomllib.loads(f"k = {token.text}")["k"]
            return str(value)
        raise ValueError(f"expected a key, found {token.text!r}")

    def key_value(self, table: KeyPath) -> None:
        line = self.peek().line  # type: ignore[union-attr]
        path = (*table, *self.key())
        for length in range(len(table) + 1, len(path) + 1):
            self.note(path[:length], line)
        self.take("=")
        self.value(path)

    def value(self, path: KeyPath) -> None:
        token = self.take()
        if token.kind == "[":
            self.array(path)
        elif token.kind == "{":
            self.inline_table(path)
        elif token.kind == "bare":  # a number or date may span tokens: 1.5, 1979-05-27 07:32
            while (nxt := self.peek()) is not None and nxt.kind in ("bare", "."):
                self.pos += 1
        elif token.kind != "str":
            raise ValueError(f"expected a value, found {token.text!r}")

    def array(self, path: KeyPath) -> None:
        index = 0
        while True:
            self.skip_newlines()
            token = self.peek()
            if token is None:
                raise ValueError("unterminated array")
            if token.kind == "]":
                self.take("]")
                return
            self.note((*path, index), token.line)
            self.value((*path, index))
            index += 1
            self.skip_newlines()
            if self.peek() is not None and self.peek().kind == ",":  # type: ignore[union-attr]
                self.take(",")

    def inline_table(self, path: KeyPath) -> None:
        while True:
            token = self.peek()
            if token is None:
                raise ValueError("unterminated inline table")
            if token.kind == "}":
                self.take("}")
                return
            if token.kind == ",":
                self.take(",")
                continue
            self.key_value(path)
