"""The forced-TLS rule as a pure function: what each option gets before and after STARTTLS."""

from __future__ import annotations

import pytest

from livemig.storage.nbd import protocol as p
from livemig.storage.nbd.protocol import Option, TlsGate


@pytest.mark.parametrize(
    ("option", "before", "after"),
    [
        (Option.STARTTLS, TlsGate.START, TlsGate.ALREADY),
        (Option.ABORT, TlsGate.PASS, TlsGate.PASS),
        (Option.EXPORT_NAME, TlsGate.CLOSE, TlsGate.PASS),
        (Option.GO, TlsGate.REQUIRE, TlsGate.PASS),
        (Option.INFO, TlsGate.REQUIRE, TlsGate.PASS),
        (Option.LIST, TlsGate.REQUIRE, TlsGate.PASS),
        (Option.STRUCTURED_REPLY, TlsGate.REQUIRE, TlsGate.PASS),
        (Option.SET_META_CONTEXT, TlsGate.REQUIRE, TlsGate.PASS),
        (12345, TlsGate.REQUIRE, TlsGate.PASS),  # unknown options too: TLS first
    ],
)
def test_tls_gate(option: int, before: TlsGate, after: TlsGate) -> None:
    assert p.tls_gate(option, tls_active=False) is before
    assert p.tls_gate(option, tls_active=True) is after


def test_option_names_as_clients_print_them() -> None:
    assert p.option_name(Option.GO) == "go"
    assert p.option_name(99) == "99"
