"""PII redaction: emails, phone numbers, payment cards and IBANs.

Redaction replaces each match with a typed placeholder (``[EMAIL]``, ``[PHONE]``,
``[CARD]``, ``[IBAN]``) so the text stays readable for training and drift reports.
Card numbers are only replaced when they pass the Luhn check and IBANs when they
pass the mod-97 check, so order numbers and amounts survive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
# 13-19 digits, optionally grouped by spaces or dashes.
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b")
# International (+CC ...) or national numbers with separators; at least 9 digits overall.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)"
)


@dataclass(frozen=True)
class Redacted:
    text: str
    count: int


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


_DIGITS = str.maketrans("", "", "0123456789")
_IBAN_HINT = re.compile(r"[A-Z]{2}\d{2}")


@lru_cache(maxsize=65536)
def redact(text: str) -> Redacted:
    """Replace PII in ``text``; returns the new text and how many spans were replaced.

    Cached: feedback repeats itself (system prompts, intent-name answers).
    """
    digits = len(text) - len(text.translate(_DIGITS))
    if digits < 9 and "@" not in text:
        return Redacted(text, 0)  # no pattern below can match: skip the regex passes
    count = 0

    def sub(pattern: re.Pattern[str], tag: str, check: object = None) -> None:
        nonlocal text, count

        def repl(match: re.Match[str]) -> str:
            nonlocal count
            value = match.group(0)
            if check is not None and not check(value):  # type: ignore[operator]
                return value
            count += 1
            return tag

        text = pattern.sub(repl, text)

    if "@" in text:
        sub(_EMAIL, "[EMAIL]")
    if _IBAN_HINT.search(text):
        sub(_IBAN, "[IBAN]", _iban_ok)
    sub(_CARD, "[CARD]", lambda v: _luhn_ok(re.sub(r"\D", "", v)))
    sub(_PHONE, "[PHONE]", lambda v: 9 <= len(re.sub(r"\D", "", v)) <= 15)
    return Redacted(text, count)


class Redactor:
    """Redacts text after text, counting the spans replaced across all of them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, text: str) -> str:
        result = redact(text)
        self.count += result.count
        return result.text
