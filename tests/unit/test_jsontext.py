"""The escaper that makes constrained JSON valid JSON (service/serving/jsontext.py), fed whole and in pieces."""

from __future__ import annotations

import json

import pytest

from service.serving.jsontext import JsonStringEscaper, valid_json_text

RAW = '{"a": "x\ty\x0e", "b": ["\\"q\\\\", "\x00"],\n "c": 1}'


def test_control_characters_inside_strings_are_escaped_and_nothing_else_changes():
    text = valid_json_text(RAW)
    assert text == '{"a": "x\\ty\\u000e", "b": ["\\"q\\\\", "\\u0000"],\n "c": 1}'  # the newline between tokens stays
    assert json.loads(text) == json.loads(RAW, strict=False)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_pieces_give_what_the_whole_gives(size):
    """A delta may end inside a string or right after a backslash; the state carries over."""
    escaper = JsonStringEscaper()
    pieces = [RAW[i:i + size] for i in range(0, len(RAW), size)]
    assert "".join(escaper.feed(p) for p in pieces) == valid_json_text(RAW)


def test_an_escaped_quote_split_from_its_backslash_does_not_end_the_string():
    escaper = JsonStringEscaper()
    assert [escaper.feed(p) for p in ['{"a": "1\\', '"', '\x01"}']] == ['{"a": "1\\', '"', '\\u0001"}']


def test_valid_json_is_returned_as_it_is():
    text = json.dumps({"k": ["a\nb", {"t": "\u00e9\\"}]}, ensure_ascii=False)
    assert valid_json_text(text) is text and valid_json_text(None) is None
