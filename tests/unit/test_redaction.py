import pytest

from tuneloop.services.feedback.redaction import redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to jane.doe+bank@example.co.uk today", "write to [EMAIL] today"),
        ("card 4111 1111 1111 1111 declined", "card [CARD] declined"),
        ("card 5500-0000-0000-0004 declined", "card [CARD] declined"),
        ("card 4111111111111111", "card [CARD]"),
        ("call +44 20 7946 0958 please", "call [PHONE] please"),
        ("call (555) 123-4567", "call [PHONE]"),
        ("phone 555.123.4567", "phone [PHONE]"),
        ("iban GB82 WEST 1234 5698 7654 32 thanks", "iban [IBAN] thanks"),
        ("iban DE89370400440532013000", "iban [IBAN]"),
    ],
)
def test_pii_is_replaced(text: str, expected: str) -> None:
    result = redact(text)
    assert result.text == expected
    assert result.count == 1


@pytest.mark.parametrize(
    "text",
    [
        "I was charged 1250 euros on 2024-03-01",
        "order 123456 never arrived",
        "card 4111 1111 1111 1112 fails Luhn",  # not a valid card number
        "reference GB00WEST fails mod-97",
        "my pin is 1234",
    ],
)
def test_ordinary_numbers_survive(text: str) -> None:
    assert redact(text).text == text


def test_several_spans_are_counted() -> None:
    result = redact("a@b.io and c@d.io, card 4111 1111 1111 1111")
    assert result.count == 3
    assert "@" not in result.text and "4111" not in result.text


# Property-based: numbers written in each script's digits, e-mail addresses in any script.
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# The zero of each script a customer may type numbers in.
SCRIPTS = {"ascii": "0", "arabic-indic": "\u0660", "extended arabic-indic": "\u06f0",
           "devanagari": "\u0966", "bengali": "\u09e6", "thai": "\u0e50", "full-width": "\uff10"}


def in_script(number: str, zero: str) -> str:
    return "".join(chr(ord(zero) + int(c)) if c.isdigit() else c for c in number)


def luhn_complete(body: str) -> str:
    for check in "0123456789":
        digits = body + check
        total = sum((d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 else d
                    for i, d in enumerate(int(c) for c in reversed(digits)))
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


@settings(max_examples=60, deadline=None)
@given(script=st.sampled_from(sorted(SCRIPTS)),
       groups=st.lists(st.text("0123456789", min_size=3, max_size=4), min_size=3, max_size=4),
       sep=st.sampled_from([" ", "-", ".", "\u3000", "\u2013"]))
def test_phone_numbers_in_any_script_are_redacted(script: str, groups: list[str], sep: str) -> None:
    number = sep.join(groups)
    if not 9 <= sum(len(g) for g in groups) <= 15:
        return
    written = in_script(number, SCRIPTS[script])
    result = redact(f"call me on {written} tomorrow")
    # A number that also passes the Luhn check reads as a card; either way it is gone.
    assert result.text in ("call me on [PHONE] tomorrow", "call me on [CARD] tomorrow"), result


@settings(max_examples=60, deadline=None)
@given(script=st.sampled_from(sorted(SCRIPTS)), body=st.text("0123456789", min_size=14, max_size=14))
def test_card_numbers_in_any_script_are_redacted(script: str, body: str) -> None:
    card = luhn_complete("4" + body)
    grouped = " ".join(card[i:i + 4] for i in range(0, 16, 4))
    result = redact(f"card {in_script(grouped, SCRIPTS[script])} was declined")
    assert result.text == "card [CARD] was declined", result


LETTERS = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzéüñçøßжщдлüاسمحمد用户例子中国भारतनाम"))


@settings(max_examples=60, deadline=None)
@given(local=st.lists(LETTERS, min_size=1, max_size=10), domain=st.lists(LETTERS, min_size=1,
       max_size=10), tld=st.sampled_from(["com", "de", "рф", "中国", "भारत", "xn--p1ai"]),
       full_width=st.booleans())
def test_internationalised_email_addresses_are_redacted(local: list[str], domain: list[str],
                                                         tld: str, full_width: bool) -> None:
    address = f"{''.join(local)}@{''.join(domain)}.{tld}"
    if full_width:  # the ASCII letters and the @ and dot typed full-width
        address = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in address)
    result = redact(f"write to {address} today")
    assert result.text == "write to [EMAIL] today", result


def test_text_around_a_match_keeps_its_own_digits_and_letters() -> None:
    """Only the match is replaced: digits of another script elsewhere stay as written."""
    text = "طلب رقم ١٢٣ — اتصل على ٠٥٥٥١٢٣٤٥٦٧"
    assert redact(text).text == "طلب رقم ١٢٣ — اتصل على [PHONE]"
