"""Personal data and secrets in a document replaced by placeholders (<EMAIL>, <PHONE>, ...).

Runs before anything else looks at the text (node/curation.py), over whole corpora, so every
pattern is compiled once, anchored by a literal or a guard that lets the regex engine skip
most positions, and bounded or possessive where a long run of look-alike characters could
make it backtrack. Kinds are replaced in a fixed order: private-key blocks, API keys, card
numbers, e-mail addresses, IP addresses, phone numbers (a key or a card number is never
half-eaten as a phone; placeholders hold no digits, `@` or dots for later kinds to match).

No datatrove here: its PIIFormatter does e-mails and public IPv4 only, does not count what it
replaced, has no word guards (it replaces the "1.2.3.4" inside "1.2.3.4.5") and its e-mail
regex backtracks quadratically over long runs such as base64 blobs. Its one policy kept here
is to replace only *global* IP addresses: private, loopback, link-local and documentation
ranges (10.0.0.1, 192.168.1.1, 127.0.0.1, 2001:db8::1) name no one, and are common in
technical text worth training on.

Look-alikes that are kept, by design: dates (2024-01-05), times, version numbers with a
letter before them or more than four parts (v1.2.3.4, 1.2.3.4.5: a bare dotted quad of
octets such as 1.2.3.4 is an IP address, whatever it meant), numbers that fail the Luhn
check or do not start like a card (2-6), integers in code, phone numbers without a separator
or country code (5551234567), public-key blocks and certificates.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from node.curation_config import PIIConfig

PLACEHOLDERS = {"emails": "<EMAIL>", "phone_numbers": "<PHONE>",
                "ip_addresses": "<IP_ADDRESS>", "credit_cards": "<CREDIT_CARD>",
                "api_keys": "<API_KEY>", "private_keys": "<PRIVATE_KEY>"}  # fmt: skip


def _after(first: str, not_after: str, rest: str) -> str:
    """`first` (one character or class) then `rest`, unless right after a `not_after`
    character. The guard comes after `first`, not as a leading lookbehind: a pattern that
    starts with a character lets the regex engine skip to the positions that hold one (one
    that starts with an assertion is tried at every position, twice as slow)."""
    return f"{first}(?<!{not_after}{first}){rest}"


_KEYCHAR = "[A-Za-z0-9_]"  # what may not come right before a key

# A PEM private-key block through its matching END line; an unterminated one to the end of
# the text (what follows BEGIN is key material until proven otherwise).
_PRIVATE_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?)-----(?:.*?-----END \1-----|.*)", re.S
)

# Well-known token formats; each needs its literal prefix, so prose never matches.
_API_KEY = re.compile(
    _after("A", _KEYCHAR, r"(?:(?:KIA|SIA)[A-Z0-9]{16}(?![A-Za-z0-9])"  # AWS access key id
                          r"|Iza[A-Za-z0-9_-]{35}(?![A-Za-z0-9_-]))")  # Google API key
    + "|" + _after("g", _KEYCHAR, r"(?:h[pousr]_[A-Za-z0-9]{30,255}+"  # GitHub tokens
                                  r"|ithub_pat_[A-Za-z0-9_]{22,255}+)")  # fine-grained
    + "|" + _after("x", _KEYCHAR, r"ox[abposr]-[A-Za-z0-9-]{10,255}+")  # Slack
    + "|" + _after("s", _KEYCHAR, r"k(?:_(?:live|test)_[A-Za-z0-9]{10,247}+"  # Stripe secret
                                  # OpenAI-style: 20+ characters, a digit among them
                                  r"|-(?=[A-Za-z0-9_-]{0,255}\d)[A-Za-z0-9_-]{20,255}+)")
    + "|" + _after("r", _KEYCHAR, r"k_(?:live|test)_[A-Za-z0-9]{10,247}+")  # Stripe restricted
    + "|" + _after("e", _KEYCHAR, r"yJ[A-Za-z0-9_-]{4,}+\.eyJ[A-Za-z0-9_-]{4,}+\.[A-Za-z0-9_-]*+")  # JWT
)  # fmt: skip

# 13-19 digits, bare or in groups of 3-6 after a first group of 4, one separator throughout
# (4-4-4-4, Amex 4-6-5). Not inside a longer number, a decimal or a word.
_CARD = re.compile(
    _after("[0-9]", r"[\w.,+-]", r"(?:[0-9]{12,18}|[0-9]{3}([ -])[0-9]{3,6}(?:\1[0-9]{3,6}){1,3})")
    + r"(?![\w]|[.,-][0-9])"
)

_EMAIL = re.compile(
    r"[A-Za-z0-9._%+-]{1,64}+@(?<![A-Za-z0-9._%+-]{65}@)"  # a local part of at most 64
    r"(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,63}(?![A-Za-z0-9-])"
)

# Dotted quads, and IPv6 candidates in the global unicast block 2000::/3 (a first group of
# 2000-3fff; the others are local, reserved or, like "a::b" and "::2", C++ scopes and
# slices that Python's ipaddress would call global). ipaddress decides what is an address,
# and which are global. In "::ffff:8.8.8.8" the dotted quad is replaced on its own.
_IP = re.compile(
    _after("[0-9]", r"[\w.]", r"[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![\w]|\.[0-9])")
    + "|" + _after("[23]", r"[\w:.]", r"[0-9A-Fa-f]{3}:[0-9A-Fa-f:]{1,35}+(?![\w:]|\.[0-9])")
)  # fmt: skip

# International numbers need the +country code; national ones the North American shapes
# (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-0199. Separators are mandatory
# between groups, so a run of digits is never split in many ways (no backtracking blow-up).
_PHONE = re.compile(
    _after(r"\+", r"[\w+]", r"(?:[0-9]{8,15}|[0-9]{1,3}(?:[ .-]?\([0-9]{1,4}\))?"
                            r"(?:[ .-][0-9]{1,5}){1,6})(?![\w+]|[.-][0-9])")
    + "|" + _after(r"\(", r"[\w+]", r"[0-9]{3}\) ?[0-9]{3}[ .-][0-9]{4}(?![\w]|[./-][0-9])")
    + "|" + _after("[0-9]", r"[\w.+/-]", r"[0-9]{2}([-.])[0-9]{3}\1[0-9]{4}(?![\w]|[./-][0-9])")
    + "|" + _after("1", r"[\w.+/-]", r"([-.])[0-9]{3}\2[0-9]{3}\2[0-9]{4}(?![\w]|[./-][0-9])")
)  # fmt: skip


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(match: str) -> bool:
    digits = match.replace(" ", "").replace("-", "")
    # Issuers' numbers start with 2-6 (Mastercard, Amex/Diners/JCB, Visa, Mastercard,
    # Discover/UnionPay/Maestro); 1, 7, 8, 9 and 0 are timestamps, ids and constants.
    return 13 <= len(digits) <= 19 and "2" <= digits[0] <= "6" and _luhn(digits)


def _is_global_ip(match: str) -> bool:
    try:
        return ipaddress.ip_address(match).is_global
    except ValueError:
        return False


def _is_phone(match: str) -> bool:
    return 8 <= sum(ch.isdigit() for ch in match) <= 15


class _Kind:
    """One kind of PII: where it may be (a cheap substring test), its pattern, a check."""

    def __init__(
        self,
        name: str,
        pattern: re.Pattern,
        hint: Callable[[str], bool],
        valid: Callable[[str], bool] | None = None,
    ) -> None:
        self.name, self.pattern, self.hint, self.valid = name, pattern, hint, valid
        self.placeholder = PLACEHOLDERS[name]

    def replace(self, text: str) -> tuple[str, int]:
        if not self.hint(text):
            return text, 0
        if self.valid is None:
            return self.pattern.subn(self.placeholder, text)
        count = 0

        def sub(m: re.Match) -> str:
            nonlocal count
            if not self.valid(m.group()):
                return m.group()
            count += 1
            return self.placeholder

        return self.pattern.sub(sub, text), count


def _any_digit(text: str) -> bool:
    return any(d in text for d in "0123456789")


# The order in which kinds are replaced (see the module's docstring).
_KINDS = (
    _Kind("private_keys", _PRIVATE_KEY, lambda t: "-----BEGIN " in t),
    _Kind("api_keys", _API_KEY, lambda t: True),
    _Kind("credit_cards", _CARD, _any_digit, _is_card),
    _Kind("emails", _EMAIL, lambda t: "@" in t),
    _Kind("ip_addresses", _IP, lambda t: True, _is_global_ip),
    _Kind("phone_numbers", _PHONE, _any_digit, _is_phone),
)


class PIIScrubber:
    def __init__(self, config: PIIConfig) -> None:
        self.config = config
        enabled = config.enabled
        self.kinds = [k for k in _KINDS if enabled and getattr(config, k.name)]

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        """`text` with each enabled kind replaced by its placeholder, and how many of each
        kind were replaced (every enabled kind, 0 included; {} when PII is disabled)."""
        counts = {}
        for kind in self.kinds:
            text, counts[kind.name] = kind.replace(text)
        return text, counts
