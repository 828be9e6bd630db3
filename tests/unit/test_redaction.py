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
