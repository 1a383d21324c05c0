"""Evaluation metrics on known strings."""

from __future__ import annotations

import pytest

from trainer.evaluate import normalise, scores


def test_normalise():
    assert normalise("  Red. ") == "red"
    assert normalise("A  red\ncircle!") == "a red circle"


def test_scores_known_values():
    result = scores(["red", "Blue.", "a green square"], ["red", "blue", "a red square"])
    assert result["n"] == 3
    assert result["exact_match"] == pytest.approx(2 / 3)
    assert result["rouge_l"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert 0 <= result["bleu"] < 100  # 4-gram BLEU of one-word answers is 0 by definition
    perfect = scores(["a b c d"], ["a b c d"])
    assert perfect["exact_match"] == 1.0 and perfect["bleu"] == pytest.approx(100.0)
