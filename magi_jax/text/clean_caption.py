"""Prompt cleaner used by MAGI-1 before T5 tokenisation
(a port of the DeepFloyd-IF caption cleaner).

MAGI-1's `T5Embedder.text_preprocessing` passes every prompt through the DeepFloyd-IF / PixArt
`clean_caption` routine: URL-unquote and lowercase, delete URLs, HTML markup, @handles, CJK
ideographs, file names, ids and marketing phrases, normalise dashes and quotes, repair the text
with `ftfy`, then tidy punctuation and whitespace. This module reproduces that routine step for
step, with the same character sets and the same order, because the T5 token ids depend on every
character it keeps. It needs `ftfy` (the official pin is 6.2.0) and `beautifulsoup4` (pin
4.13.4, used with the stdlib `html.parser` backend). The official pipeline applies the cleaner
**twice** and a second pass does change some outputs (a deletion can leave behind a new
leading `:`, a ` . ` or a URL-like fragment), so `preprocess_prompt`, which is what the pipeline
tokenises, runs `clean_caption` two times.
"""

from __future__ import annotations

import html
import re
import urllib.parse
import warnings

import bs4
import ftfy

__all__ = ["clean_caption", "preprocess_prompt"]

# bs4 warns when its input looks like a file name or a URL ("report.pdf"); for a prompt that is
# expected, and the warning changes nothing in the output.
warnings.filterwarnings("ignore", category=bs4.MarkupResemblesLocatorWarning)

# A rule is (name, compiled pattern, replacement); rules of a table run in the order listed.
_Rule = tuple[str, "re.Pattern[str]", str]


def _table(*rules: tuple[str, str, str]) -> tuple[_Rule, ...]:
  return tuple((name, re.compile(pattern), repl) for name, pattern, repl in rules)


def _run(rules: tuple[_Rule, ...], text: str) -> str:
  for _, pattern, repl in rules:
    text = pattern.sub(repl, text)
  return text


# The tail of a URL-like token: `<host chars>.<tld>` plus an optional path, not followed by `@`.
_URL_TAIL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"

# Step 1 (after unquote/strip/lower) and step 2: literal <person> tag, then two URL sweeps. The
# second sweep repeats the domain alternative, so a domain uncovered by the first one goes too.
_BEFORE_HTML = _table(
    ("person_tag", r"<person>", "person"),
    ("url_http", r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL + r"))", ""),
    ("url_www", r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL + r"))", ""),
)

# Dash-like code points: hyphen-minus, Armenian hyphen, Hebrew maqaf, Canadian syllabics hyphen,
# Mongolian todo hyphen, U+2010..U+2015 (hyphen .. horizontal bar), a few supplemental-punctuation
# dashes, wave dash, wavy dash, katakana-hiragana double hyphen, and small/fullwidth CJK forms.
# U+2212 MINUS SIGN is deliberately absent (the official set does not contain it).
_DASHES = (
    "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40"
    "\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d"
)

# Symbols turned into a space (runs collapse to one space); backslash and slash included.
_BAD_PUNCT = "#\u00ae\u2022\u00a9\u2122&@\u00b7\u00ba\u00bd\u00be\u00bf\u00a1\u00a7~)(][}{|\\/*"

# Steps 4 to 8, applied to the text bs4 extracted.
_AFTER_HTML = _table(
    # step 4: @handles; CJK strokes, enclosed/compatibility forms and ideographs. The official
    # routine deletes U+31C0-31FF, 3200-33FF, 3400-4DFF and 4E00-9FFF one range at a time; the
    # ranges are contiguous and deletion is per character, so one class gives the same text.
    # Hiragana, katakana (U+3040-30FF), Hangul and emoji lie outside and are kept.
    ("at_handle", r"@[\w\d]+\b", ""),
    ("cjk", "[\u31c0-\u9fff]+", ""),
    # step 5: dashes to "-", quote look-alikes to ASCII quotes.
    ("dashes", "[" + _DASHES + "]+", "-"),
    ("double_quotes", "[`\u00b4\u00ab\u00bb\u201c\u201d\u00a8]", '"'),
    ("single_quotes", "[\u2018\u2019]", "'"),
    # step 6: leftover entity names, IPv4-like numbers, a trailing "d:dd " id, literal "\n".
    ("entity_quot", r"&quot;?", ""),
    ("entity_amp", r"&amp", ""),
    ("ipv4", r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),
    ("trailing_article_id", r"\d:\d\d\s+$", ""),
    ("escaped_newline", r"\\n", " "),
    # step 7: "#" + 1-3 or 5+ digits (4 digits, a year, survive), long bare numbers, file names.
    ("hash_short_number", r"#\d{1,3}\b", ""),
    ("hash_long_number", r"#\d{5,}\b", ""),
    ("long_number", r"\b\d{6,}\b", ""),
    ("file_name", r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),
    # step 8: repeated quotes, ellipses, symbol runs, an isolated " . ".
    ("quote_run", r"[\"\']{2,}", '"'),
    ("dot_run", r"[\.]{2,}", " "),
    ("bad_punct", "[" + re.escape(_BAD_PUNCT) + "]+", " "),
    ("lone_dot", r"\s+\.\s+", " "),
)

# Step 9: with more than three "-"/"_" in the text, every one of them becomes a space
# ("this-is-my-cute-cat_video" -> words); with three or fewer they all stay.
_WORD_SEPARATOR = re.compile(r"[-_]")
_MAX_KEPT_SEPARATORS = 3

# Steps 11 and 12, applied after ftfy/unescape.
_AFTER_FIX = _table(
    # step 11: product-code-like tokens ("jc6640", "jc6640vc", "6640vc231") ...
    ("letters_then_digits", r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),
    ("letters_digits_letters", r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
    ("digits_letters_digits", r"\b\d+[a-zA-Z]+\d+\b", ""),
    # ... marketing / stock-site phrases ...
    ("shipping", r"(worldwide\s+)?(free\s+)?shipping", ""),
    ("download", r"(free\s)?download(\sfree)?", ""),
    ("click_for_on", r"\bclick\b\s(?:for|on)\s\w+", ""),
    ("format_word", r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    ("page_number", r"\bpage\s+\d+\b", ""),
    # ... longer alternating letter/digit codes ("j2d1a2a") become a space ...
    ("mixed_code", r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),
    # ... and dimensions with ASCII x, Cyrillic small ha (U+0445) or the multiplication sign.
    ("dimensions", "\\b\\d+\\.?\\d*[x\u0445\u00d7]\\d+\\.?\\d*\\b", ""),
    # step 12: " : " -> ": ", a space after , . / that follows a non-digit, one space per run.
    ("spaced_colon", r"\b\s+\:\s+", ": "),
    ("space_after_punct", r"(\D[,\./])\b", r"\1 "),
    ("whitespace", r"\s+", " "),
)

# Step 13. NB: the text is *not* stripped before these (the official code calls `.strip()`
# without using the result), so a leading space from step 12 stops the first three anchors.
_EDGES = _table(
    ("quoted_whole", r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    ("leading_punct", r"^[\'\_,\-\:;]", ""),
    ("trailing_punct", r"[\'\_,\-\:\-\+]$", ""),
    ("dot_token", r"^\.\S+$", ""),
)


def clean_caption(text: str) -> str:
  """One pass of the official caption cleaner (see the module docstring).

  Raises:
    TypeError: `text` is not a `str` (the official code would silently clean `str(text)`,
      turning `None` into the prompt "none").
  """
  if not isinstance(text, str):
    raise TypeError(f"clean_caption expects a str prompt, got {type(text).__name__}: {text!r:.80}")
  # step 1: "%20"/"+" decoding happens before anything else, and lowercasing before ftfy,
  # so ftfy later sees lowercased mojibake and leaves it unrepaired.
  text = urllib.parse.unquote_plus(text).strip().lower()
  text = _run(_BEFORE_HTML, text)
  # step 3: keep only the text content (tags dropped, entities decoded).
  text = bs4.BeautifulSoup(text, features="html.parser").text
  text = _run(_AFTER_HTML, text)
  if len(_WORD_SEPARATOR.findall(text)) > _MAX_KEPT_SEPARATORS:
    text = _WORD_SEPARATOR.sub(" ", text)
  # step 10: unicode repair, entity decoding (twice, for double-escaped input), strip.
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  text = _run(_AFTER_FIX, text)
  text = _run(_EDGES, text)
  return text.strip()


def preprocess_prompt(text: str) -> str:
  """The text MAGI-1 tokenises for a prompt: `clean_caption` applied twice."""
  return clean_caption(clean_caption(text))
