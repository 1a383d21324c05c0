"""Constrained JSON made valid JSON: raw control characters inside its strings escaped, streamed or whole.

RFC 8259 forbids U+0000-U+001F unescaped inside a JSON string, and strict parsers refuse them (Python's
`json.loads`, pydantic, so `client.chat.completions.parse()`). vLLM's default structured-output backend,
xgrammar (0.2.8, as vLLM pins it), compiles a string with `minLength` / `maxLength` to a bounded repetition of
`[^"\\\\\\r\\n]`, which admits the other control characters (a tab, U+000E, ...): a model that samples one
there returns JSON its own schema's parsers reject (xgrammar issue #800, fixes not released). vlora escapes
such a character where it stands (`\\t`, `\\u000e`), so the answer is the JSON the model meant: the decoded
string, and so `maxLength`, is unchanged, and no token is sampled differently from vLLM's own server.

Written by hand: no JSON library rewrites a stream of JSON prefixes (a delta may end inside a string or after
a backslash); the grammar has already made the text a JSON prefix, so a scan for quotes, backslashes and
control characters, with two bits of state carried between deltas, is all it takes.
"""

from __future__ import annotations

import re

_SPECIAL = re.compile(r'["\\\x00-\x1f]')
_SHORT = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(ch: str) -> str:
    return _SHORT.get(ch) or f"\\u{ord(ch):04x}"


class JsonStringEscaper:
    """Feeds successive pieces of one JSON text; returns each with the control characters inside its strings
    escaped (whitespace between tokens, outside strings, is left as it is)."""

    def __init__(self) -> None:
        self.in_string = False
        self.escaping = False  # the previous piece ended with a backslash inside a string

    def feed(self, text: str) -> str:
        out, last = [], 0
        escaped_at = 0 if self.escaping else -1  # where the character a backslash escapes stands
        self.escaping = False
        for m in _SPECIAL.finditer(text):
            i, ch = m.start(), m.group()
            if i == escaped_at:
                continue
            if not self.in_string:
                self.in_string = ch == '"'
            elif ch == '"':
                self.in_string = False
            elif ch == "\\":
                if i + 1 == len(text):
                    self.escaping = True
                escaped_at = i + 1
            else:
                out += [text[last:i], escape(ch)]
                last = i + 1
        return "".join(out) + text[last:] if out else text


def valid_json_text(text: str | None) -> str | None:
    """A whole constrained output with its strings' control characters escaped."""
    return JsonStringEscaper().feed(text) if text else text
