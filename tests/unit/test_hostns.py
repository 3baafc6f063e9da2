"""Namespace-host names and addresses, and the migration URIs the shaper can match (no root)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.errors import Conflict
from livemig.host.shaping import _htb_rate, _parse_tcp_uri
from livemig.region.hostns import NamespaceLayout

IFNAMSIZ = 15  # usable characters of a Linux interface name


@given(st.integers(min_value=0, max_value=199), st.integers(min_value=0, max_value=9))
def test_every_name_fits_an_interface_and_every_address_is_valid(region: int, index: int) -> None:
    layout = NamespaceLayout(region)
    for name in (layout.service_bridge, layout.migration_bridge, f"{layout.netns(index)}s", f"{layout.netns(index)}m"):
        assert len(name) <= IFNAMSIZ, name
    service = ipaddress.ip_address(layout.service_address(index))
    migration = ipaddress.ip_address(layout.migration_address(index))
    assert service in ipaddress.ip_network(f"{layout.service_gateway}/24", strict=False)
    assert migration not in ipaddress.ip_network(f"{layout.service_gateway}/24", strict=False)


def test_layout_is_stable_per_state_dir(tmp_path: Path) -> None:
    assert NamespaceLayout.for_state_dir(tmp_path) == NamespaceLayout.for_state_dir(tmp_path / ".")
    assert 0 <= NamespaceLayout.for_state_dir(tmp_path).region < 200


def test_tcp_uris_parse_and_others_are_refused() -> None:
    assert _parse_tcp_uri("tcp:10.214.3.2:41234") == ("10.214.3.2", 41234)
    for bad in ("unix:/run/x.sock", "tcp:10.0.0.1", "tcp::80", "exec:cat", "tcp:10.0.0.1:http"):
        with pytest.raises(Conflict, match="expected tcp:ADDRESS:PORT"):
            _parse_tcp_uri(bad)


def test_a_share_is_a_ceiling_in_bits() -> None:
    args = _htb_rate(24)
    assert args[args.index("rate") + 1] == args[args.index("ceil") + 1] == f"{24 * 1024 * 1024 * 8}bit"


def test_namespace_hosts_without_root_get_a_clear_error_and_start_nothing(tmp_path: Path, monkeypatch) -> None:
    from livemig.errors import BootstrapError
    from livemig.region.local import Region

    monkeypatch.setattr("livemig.region.hostns.os.geteuid", lambda: 1000)
    region = Region(tmp_path)
    with pytest.raises(BootstrapError, match="namespace hosts need root"):
        region.up(("A", "B"), netns=True)
    assert region.load() is None and not (tmp_path / "logs").exists()
