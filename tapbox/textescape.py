"""Escaping untrusted text before it reaches a terminal or a line-oriented file.

How this works
--------------
Strings that come from the sandbox (process names and argv, DNS names) or from a file another
program wrote (an event log read by `tapbox log show`) may carry bytes a terminal obeys: ESC and
the other C0 controls start escape sequences (erase a line, set the window title, OSC 52
clipboard writes), C1 controls (U+0080-U+009F) are their 8-bit forms, a newline or carriage
return forges a line of its own, and Unicode format characters (bidi overrides U+202A-U+202E,
isolates U+2066-U+2069, zero-width characters) reorder or hide what is shown. `escape()` turns
every such character into a visible escape (``\\x1b``, ``\\u202e``), and leaves everything else
as it is.

It is the one escaping function of tapbox: every place that prints such a string calls it (the
-v and denial lines, the exit summary, `tapbox log show`, the header of a learned allowlist).
It is idempotent (its output holds only printable characters, and a backslash is printable), so
a field escaped when a table is laid out may safely pass through a sink that escapes whole lines
again. JSON output is not escaped with it: json.dumps escapes by itself.
"""

from __future__ import annotations

import unicodedata

# Unicode general categories shown escaped: Cc (C0, DEL, C1 controls), Cf (format: bidi
# controls, zero-width joiners, soft hyphen...), Zl and Zp (line and paragraph separators),
# Cs (lone surrogates, from undecodable bytes).
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def escape(text: object) -> str:
    """`text` (str() of it) with every control and format character written as an escape."""
    text = text if isinstance(text, str) else str(text)
    if text.isprintable():  # the common case: nothing to do (isprintable() is stricter)
        return text
    return "".join(_escape_char(ch) if unicodedata.category(ch) in _ESCAPED_CATEGORIES else ch
                   for ch in text)


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
