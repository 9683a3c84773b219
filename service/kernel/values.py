"""The rules for single values that the domain checks and the HTTP schema states: one copy.

The domain refuses a command that breaks them (``InvalidCommand``); the edge declares the same
rules in its wire schemas, so a request that breaks them is a 400 before it reaches the domain.
"""

import re
from typing import Final, Literal, get_args

# ISO 4217 codes of the currencies in circulation (no funds, metals, test or "no currency" codes).
# Amend when ISO 4217 does: a code missing here is refused (a 400 at the HTTP edge).
# fmt: off
Currency = Literal[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF",
    "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP",
    "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD",
    "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY",
    "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD",
    "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK",
    "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK",
    "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG",
    "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS",
    "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VED",
    "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
]
# fmt: on
CURRENCIES: Final = frozenset(get_args(Currency))

# Control characters other than tab and newlines, as the body of a regular-expression character
# class: NUL in particular no database stores. Raw, so that a JSON Schema pattern reads it too.
CONTROL_CHARACTERS: Final = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f"
# A text that holds none of them: the pattern the wire schemas state.
NO_CONTROL_CHARACTERS_PATTERN: Final = rf"^[^{CONTROL_CHARACTERS}]*$"

_CONTROL_CHARACTER = re.compile(f"[{CONTROL_CHARACTERS}]")


def is_currency(code: str) -> bool:
    """Whether ``code`` is the ISO 4217 code of a currency in circulation (``"EUR"``)."""
    return code in CURRENCIES


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a control character other than tab and newlines."""
    return _CONTROL_CHARACTER.search(text) is not None
