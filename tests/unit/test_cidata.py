"""The NoCloud seed: bad input is refused before anything is written; good input makes a disk.

Why: a bad host name or a damaged key would otherwise surface minutes later as a guest that
never answers SSH. The disk itself is built with the real dosfstools and mtools (fast, no
root) and read back with mtools, so the label and the file contents are what cloud-init sees.
"""

from __future__ import annotations

import base64
import json
import struct
import subprocess
from pathlib import Path

import pytest

from livemig.errors import InvalidRequest
from livemig.guest.cidata import CIDATA_LABEL, NETWORK_CONFIG, build_cidata, seed_files, validate_ssh_public_key


def _key(key_type: str = "ssh-ed25519", body: bytes = b"\x11" * 32, comment: str = "user@host") -> str:
    blob = struct.pack(">I", len(key_type)) + key_type.encode() + struct.pack(">I", len(body)) + body
    return f"{key_type} {base64.b64encode(blob).decode()} {comment}".strip()


GOOD_KEY = _key()


@pytest.mark.parametrize(
    "hostname",
    ["", "-leading", "trailing-", "under_score", "spa ce", "a" * 64, "dot..dot", "ends.in.123", "x" * 250 + ".com",
     "new\nline", "host;rm -rf"],
)  # fmt: skip
def test_bad_host_names_are_refused(tmp_path: Path, hostname: str) -> None:
    target = tmp_path / "seed.img"
    with pytest.raises(InvalidRequest) as info:
        build_cidata(target, hostname=hostname, ssh_public_keys=[GOOD_KEY], instance_id="i-1")
    assert info.value.details["field"] == "hostname"
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "key",
    [
        "",
        "garbage",
        "ssh-ed25519",
        "ssh-ed25519 not-base64!!",
        "ssh-dss " + base64.b64encode(b"\0\0\0\x07ssh-dss" + b"x" * 20).decode(),
        _key().replace("ssh-ed25519 ", "ssh-rsa ", 1),  # the blob says ed25519
        "ssh-ed25519 " + base64.b64encode(b"\0\0\0\x0bssh-ed25519").decode(),  # type only, no key
        GOOD_KEY[:40],  # truncated paste
        GOOD_KEY + "\nssh-ed25519 AAAA",  # two lines in one
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
    ],
)
def test_bad_keys_are_refused(tmp_path: Path, key: str) -> None:
    target = tmp_path / "seed.img"
    with pytest.raises(InvalidRequest) as info:
        build_cidata(target, hostname="vm1", ssh_public_keys=[key], instance_id="i-1")
    assert info.value.details["field"] == "ssh_public_keys"
    assert list(tmp_path.iterdir()) == []


def test_no_keys_and_a_bare_string_are_refused(tmp_path: Path) -> None:
    cases: tuple[list[str], str] = ([], GOOD_KEY)
    for keys in cases:
        with pytest.raises(InvalidRequest, match="at least one SSH public key"):
            build_cidata(tmp_path / "seed.img", hostname="vm1", ssh_public_keys=keys, instance_id="i-1")


@pytest.mark.parametrize("instance_id", ["", "has space", "a" * 129, 'quote"d', "-x"])
def test_bad_instance_ids_are_refused(tmp_path: Path, instance_id: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        build_cidata(tmp_path / "seed.img", hostname="vm1", ssh_public_keys=[GOOD_KEY], instance_id=instance_id)
    assert info.value.details["field"] == "instance_id"


def test_real_keys_from_ssh_keygen_pass(tmp_path: Path) -> None:
    for key_type in ("ed25519", "ecdsa", "rsa"):
        key = tmp_path / f"id_{key_type}"
        subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", "a b c", "-f", str(key)], check=True)
        line = key.with_suffix(".pub").read_text()
        assert validate_ssh_public_key(line) == line.strip()


def test_seed_files_say_what_cloud_init_needs() -> None:
    files = seed_files(hostname="web-1.example.org", ssh_public_keys=[GOOD_KEY + "\n"], instance_id="i-42")
    assert json.loads(files["meta-data"]) == {"instance-id": "i-42", "local-hostname": "web-1.example.org"}
    user_data = files["user-data"].decode()
    assert user_data.startswith("#cloud-config\n")
    assert json.loads(user_data.split("\n", 1)[1]) == {
        "hostname": "web-1",
        "fqdn": "web-1.example.org",
        "ssh_authorized_keys": [GOOD_KEY],
    }
    network = json.loads(files["network-config"])
    assert network == NETWORK_CONFIG
    (entry_id, entry), *_ = network["ethernets"].items()
    assert entry_id == entry["match"]["name"] == "e*" and entry["dhcp4"] is True


def test_builds_a_fat_disk_labelled_cidata(tmp_path: Path) -> None:
    target = tmp_path / "seed.img"
    (tmp_path / "unrelated").write_text("kept")
    result = build_cidata(target, hostname="vm1", ssh_public_keys=[GOOD_KEY], instance_id="i-1")
    assert result == target
    label = subprocess.run(["mlabel", "-s", "-i", str(target), "::"], capture_output=True, text=True, check=True)
    assert CIDATA_LABEL in label.stdout
    listing = subprocess.run(["mdir", "-b", "-i", str(target), "::/"], capture_output=True, text=True, check=True)
    assert sorted(Path(p).name for p in listing.stdout.split()) == ["meta-data", "network-config", "user-data"]
    meta = subprocess.run(["mtype", "-i", str(target), "::/meta-data"], capture_output=True, text=True, check=True)
    assert json.loads(meta.stdout)["local-hostname"] == "vm1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.img", "unrelated"]  # no temporary left
