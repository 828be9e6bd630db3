"""PII redaction: emails, phone numbers, payment cards and IBANs.

Redaction replaces each match with a typed placeholder (``[EMAIL]``, ``[PHONE]``,
``[CARD]``, ``[IBAN]``) so the text stays readable for training and drift reports.
Card numbers are only replaced when they pass the Luhn check and IBANs when they
pass the mod-97 check, so order numbers and amounts survive.

Numbers are found in any script: the patterns run on a view of the text in which every
decimal digit (Arabic-Indic, Devanagari, full-width, ...) reads as its ASCII digit and
full-width forms and other spaces as their ASCII counterparts, one character for one, so
each match maps back to the same span of the original, which is otherwise kept as it
was. E-mail addresses may have letters of any script on either side of the ``@``.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import regex

# Letters, marks and digits of any script (``regex``: Python's ``re`` has no \p{M}, and
# Devanagari's vowel signs, say, are marks).
_W = r"\p{L}\p{M}\p{N}_"
_EMAIL = regex.compile(rf"(?<![{_W}.%+-])[{_W}.%+-]+@[{_W}-]+(?:\.[{_W}-]+)*"
                       rf"\.(?=[{_W}-]*\p{{L}})[{_W}-]{{2,}}(?![{_W}])")
# 13-19 digits, optionally grouped by spaces or dashes.
_CARD = re.compile(r"(?<!\w)(?:\d[ -]?){12,18}\d(?!\w)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b")
# International (+CC ...) or national numbers with separators; at least 9 digits overall.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)"
)
_DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63"


@dataclass(frozen=True)
class Redacted:
    text: str
    count: int


class _AsciiView(dict[int, int]):
    """A ``str.translate`` table, filled as characters are met: any decimal digit to its
    ASCII digit, full-width forms to ASCII, spaces to a space and dashes to ``-``; every
    other character to itself (so the view has the original's length)."""

    def __missing__(self, cp: int) -> int:
        ch = chr(cp)
        value = cp
        if cp >= 0x80:
            digit = unicodedata.decimal(ch, None)
            if digit is not None:
                value = 0x30 + digit
            elif 0xFF01 <= cp <= 0xFF5E:
                value = cp - 0xFEE0
            elif unicodedata.category(ch) == "Zs":
                value = 0x20
            elif ch in _DASHES:
                value = 0x2D
        self[cp] = value
        return value


_VIEW = _AsciiView()


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


_IBAN_HINT = re.compile(r"[A-Z]{2}\d{2}")
_DIGITS = str.maketrans("", "", "0123456789")
_PASSES: tuple[tuple[Any, str, Callable[[str], bool] | None], ...] = (
    (_EMAIL, "[EMAIL]", None),
    (_IBAN, "[IBAN]", _iban_ok),
    (_CARD, "[CARD]", lambda v: _luhn_ok(re.sub(r"\D", "", v))),
    (_PHONE, "[PHONE]", lambda v: 9 <= len(re.sub(r"\D", "", v)) <= 15),
)


@lru_cache(maxsize=65536)
def redact(text: str) -> Redacted:
    """Replace PII in ``text``; returns the new text and how many spans were replaced.

    Cached: feedback repeats itself (system prompts, intent-name answers).
    """
    view = text.translate(_VIEW) if not text.isascii() else text
    has_at = "@" in view
    if not has_at and len(view) - len(view.translate(_DIGITS)) < 9:
        return Redacted(text, 0)  # no pattern below can match: skip the regex passes
    spans: list[tuple[int, int, str]] = []
    for pattern, tag, check in _PASSES:
        if (tag == "[EMAIL]" and not has_at) or (tag == "[IBAN]" and not _IBAN_HINT.search(view)):
            continue
        found = [(m.start(), m.end()) for m in pattern.finditer(view)
                 if check is None or check(m.group(0))]
        for start, end in found:
            spans.append((start, end, tag))
            # Masked in the view (same length), so a later pass cannot match inside it.
            view = view[:start] + "\x00" * (end - start) + view[end:]
    if not spans:
        return Redacted(text, 0)
    out, last = [], 0
    for start, end, tag in sorted(spans):
        out += [text[last:start], tag]
        last = end
    out.append(text[last:])
    return Redacted("".join(out), len(spans))


class Redactor:
    """Redacts text after text, counting the spans replaced across all of them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, text: str) -> str:
        result = redact(text)
        self.count += result.count
        return result.text
