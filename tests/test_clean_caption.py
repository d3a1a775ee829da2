"""Caption cleaner: official input/output pairs (one and two passes) and a few behaviour checks."""

import json
import os

import ftfy
import pytest

from magi_jax.text.clean_caption import clean_caption, preprocess_prompt

_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "text", "clean_caption.json")

with open(_FIXTURE, encoding="utf-8") as _f:
  _PAIRS = json.load(_f)["pairs"]

_IDS = [f"pair{i:02d}" for i in range(len(_PAIRS))]


def test_fixture_has_all_pairs():
  assert len(_PAIRS) == 27


@pytest.mark.parametrize("pair", _PAIRS, ids=_IDS)
def test_two_passes_match_official(pair):
  assert preprocess_prompt(pair["input"]) == pair["output"]


@pytest.mark.parametrize("pair", _PAIRS, ids=_IDS)
def test_one_pass_matches_official(pair):
  assert clean_caption(pair["input"]) == pair["after_one_pass"]


def test_second_pass_can_change_the_text():
  # The first pass drops the leading "-" ("+" was unquoted to a space) and the trailing ",",
  # which exposes a leading ":" that only the second pass removes.
  text = "- :leading and trailing stuff, +"
  assert clean_caption(text) == ":leading and trailing stuff"
  assert preprocess_prompt(text) == "leading and trailing stuff"
  # The fixture records the same fact for several official pairs.
  changed = [p for p in _PAIRS if not p["one_pass_equals_two"]]
  assert changed, "the fixture should contain pairs where a second pass matters"
  for p in changed:
    assert p["after_one_pass"] != p["output"]
    assert clean_caption(p["input"]) != preprocess_prompt(p["input"])


def test_lowercasing_happens_before_ftfy():
  # ftfy repairs the mojibake "Ã¼" -> "ü", but only in its original case; the cleaner
  # lowercases first, so the mojibake survives (lowercased) in the output.
  assert ftfy.fix_text("Ã¼ber") == "über"
  assert preprocess_prompt("Ã¼ber Straße") == "ã¼ber straße"


def test_cjk_ideographs_removed_kana_and_hangul_kept():
  assert preprocess_prompt("猫のキャット ひらがな 漢字 한국어") == "のキャット ひらがな 한국어"


def test_unicode_minus_is_not_a_dash_but_em_dash_is():
  assert preprocess_prompt("a\u2212b") == "a\u2212b"
  assert preprocess_prompt("a\u2014b") == "a-b"


@pytest.mark.parametrize("bad", [None, 42, b"bytes prompt", ["a list"]],
                         ids=["none", "int", "bytes", "list"])
def test_non_string_input_raises_type_error(bad):
  with pytest.raises(TypeError, match=type(bad).__name__):
    clean_caption(bad)
  with pytest.raises(TypeError, match="expects a str"):
    preprocess_prompt(bad)
