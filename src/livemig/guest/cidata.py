"""Build a cloud-init NoCloud seed: a small FAT disk labelled ``cidata``.

Why a disk and not ``ds=nocloud-net`` over HTTP: a seed disk travels with the VM (a volume
like any other), so a migrated VM reboots into the same configuration on any host, and no
seed server must be reachable from every host.

Why JSON inside the files: YAML is a superset of JSON, so ``json.dumps`` gives cloud-init valid
YAML with every string quoted and escaped, with no YAML library and no way for a host name or
key comment to inject configuration. Input is validated before anything is written, and the
image is built beside its destination and renamed into place: bad input raises
:class:`livemig.errors.InvalidRequest` and leaves nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from livemig.errors import BootstrapError, InvalidRequest

__all__ = [
    "CIDATA_LABEL",
    "NETWORK_CONFIG",
    "build_cidata",
    "validate_hostname",
    "validate_instance_id",
    "validate_ssh_public_key",
]

CIDATA_LABEL = "cidata"
_IMAGE_KIB = 1024

#: DHCP on every Ethernet NIC whose name starts with ``e`` (``eth0``, ``ens3``, ``enp0s2``).
#: The glob is the entry's id *and* its ``match``: cloud-init 22.4's networkd renderer (Debian 12)
#: writes the id as ``[Match] Name=`` and ignores ``match: name``, while netplan-based guests
#: honour ``match``. Either way every such NIC asks for an address by DHCP. The MTU is the VCN's
#: (VXLAN's 50 bytes off 1500), set here too: the vswitch's DHCP offers it (option 26), but
#: systemd-networkd takes a DHCP MTU only when told to, and a guest at 1500 loses large frames.
VCN_MTU = 1450
NETWORK_CONFIG: dict[str, object] = {
    "version": 2,
    "ethernets": {"e*": {"match": {"name": "e*"}, "dhcp4": True, "mtu": VCN_MTU}},
}

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)


def validate_hostname(hostname: str) -> str:
    """A host name or FQDN by RFC 1123: labels of letters, digits and inner hyphens."""
    if not isinstance(hostname, str) or not hostname:
        raise InvalidRequest("host name must be a non-empty string", field="hostname")
    if len(hostname) > 253:
        raise InvalidRequest(f"host name is {len(hostname)} characters, at most 253 allowed", field="hostname")
    labels = hostname.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise InvalidRequest(
                f"host name {hostname!r} is not valid: each dot-separated label must be 1-63 letters, "
                "digits or inner hyphens",
                field="hostname",
            )
    if labels[-1].isdigit():
        raise InvalidRequest(
            f"host name {hostname!r} is not valid: it must not end in a numeric label", field="hostname"
        )
    return hostname


def validate_instance_id(instance_id: str) -> str:
    """An instance id: what cloud-init keys its once-per-instance work on."""
    if not isinstance(instance_id, str) or not _INSTANCE_ID.fullmatch(instance_id):
        raise InvalidRequest(
            f"instance id {instance_id!r} is not valid: 1-128 letters, digits, '.', '_', ':' or '-'",
            field="instance_id",
        )
    return instance_id


def validate_ssh_public_key(key: str) -> str:
    """One OpenSSH public key line (``type base64 [comment]``), checked down to its wire format.

    The base64 blob must decode into length-prefixed fields that fill it exactly, the first being
    the key type the line claims: a truncated paste, a private key or a fingerprint is caught
    here, not at the first failed login.
    Returns the line stripped of surrounding white space.
    """
    if not isinstance(key, str):
        raise InvalidRequest("SSH public key must be a string", field="ssh_public_keys")
    line = key.strip()
    if not line or "\n" in line or "\r" in line or "\0" in line:
        raise InvalidRequest("SSH public key must be exactly one non-empty line", field="ssh_public_keys")
    parts = line.split(None, 2)
    if len(parts) < 2:
        raise InvalidRequest(f"SSH public key {_short(line)} needs a type and a base64 key", field="ssh_public_keys")
    key_type, blob_b64 = parts[0], parts[1]
    if key_type not in _KEY_TYPES:
        raise InvalidRequest(
            f"SSH public key type {_short(key_type)} is not one of {', '.join(sorted(_KEY_TYPES))}",
            field="ssh_public_keys",
        )
    try:
        blob = base64.b64decode(blob_b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"SSH public key {_short(line)} is not valid base64", field="ssh_public_keys") from None
    fields = _wire_fields(blob)
    if fields is None or len(fields) < 2 or fields[0] != key_type.encode():
        raise InvalidRequest(
            f"SSH public key {_short(line)} does not hold a {key_type} key (damaged or truncated)",
            field="ssh_public_keys",
        )
    if len(parts) == 3 and any(ord(c) < 0x20 for c in parts[2]):
        raise InvalidRequest("SSH public key comment must not contain control characters", field="ssh_public_keys")
    return line


def _wire_fields(blob: bytes) -> list[bytes] | None:
    """The length-prefixed fields of an SSH public key blob (RFC 4253 6.6); None unless they fill it exactly."""
    fields: list[bytes] = []
    position = 0
    while position < len(blob):
        if position + 4 > len(blob):
            return None
        (length,) = struct.unpack_from(">I", blob, position)
        position += 4
        if position + length > len(blob):
            return None
        fields.append(blob[position : position + length])
        position += length
    return fields


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def seed_files(*, hostname: str, ssh_public_keys: Sequence[str], instance_id: str) -> dict[str, bytes]:
    """The three NoCloud files, validated; what :func:`build_cidata` writes to the disk."""
    validate_hostname(hostname)
    validate_instance_id(instance_id)
    if isinstance(ssh_public_keys, str) or not ssh_public_keys:
        raise InvalidRequest("give at least one SSH public key (a list of key lines)", field="ssh_public_keys")
    keys = [validate_ssh_public_key(k) for k in ssh_public_keys]
    short = hostname.split(".", 1)[0]
    meta = {"instance-id": instance_id, "local-hostname": hostname}
    user: dict[str, object] = {"hostname": short, "ssh_authorized_keys": keys}
    if "." in hostname:
        user["fqdn"] = hostname
    return {
        "meta-data": (json.dumps(meta, indent=1) + "\n").encode(),
        "user-data": ("#cloud-config\n" + json.dumps(user, indent=1) + "\n").encode(),
        "network-config": (json.dumps(NETWORK_CONFIG, indent=1) + "\n").encode(),
    }


def _tool(argv: list[str], what: str, package: str) -> None:
    env = {**os.environ, "LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"}
    try:
        proc = subprocess.run(argv, capture_output=True, env=env, check=False, timeout=60)
    except FileNotFoundError:
        raise BootstrapError(f"{what} needs {argv[0]}: apt-get install -y {package}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BootstrapError(f"{what} failed: {exc}") from None
    if proc.returncode != 0:
        words = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise BootstrapError(f"{what} failed: {words}")


def build_cidata(path: Path, *, hostname: str, ssh_public_keys: Sequence[str], instance_id: str) -> Path:
    """Write a NoCloud seed disk (raw FAT, label ``cidata``) to ``path`` and return it.

    Raises :class:`InvalidRequest` on a bad host name, instance id or key (nothing is written),
    :class:`BootstrapError` when dosfstools or mtools are missing. ``path`` is replaced whole.
    """
    files = seed_files(hostname=hostname, ssh_public_keys=ssh_public_keys, instance_id=instance_id)
    target = Path(path)
    with tempfile.TemporaryDirectory(prefix=".cidata-", dir=target.parent) as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "cidata.img"
        _tool(
            ["mkfs.vfat", "-n", CIDATA_LABEL, "-C", str(image), str(_IMAGE_KIB)],
            "making the cidata disk (mkfs.vfat)",
            "dosfstools",
        )
        for name, data in files.items():
            (tmp / name).write_bytes(data)
            _tool(
                ["mcopy", "-o", "-i", str(image), str(tmp / name), f"::/{name}"],
                f"copying {name} to the cidata disk (mcopy)",
                "mtools",
            )
        os.chmod(image, 0o644)
        os.replace(image, target)
    return target
