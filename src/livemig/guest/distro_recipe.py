"""What goes into the Debian disk image: packages, files, units, boot loaders, layout.

Why a module of plain data: the image is cached by a hash of its recipe, so everything that
shapes the image lives here, in one place :func:`recipe_hash` can see. A change to any value
below makes the next :func:`livemig.guest.distro.build_disk_image` build a new image instead of
returning a stale one. The builder (:mod:`livemig.guest.distro`) only carries the recipe out.

Choices and why:

* **Boot loaders on one ESP, kernel on the ESP.** UEFI boots systemd-boot from the removable
  media path ``\\EFI\\BOOT\\BOOTX64.EFI`` (OVMF finds it with an empty variable store, and the
  loader changes no boot entries); BIOS boots through syslinux's ``gptmbr.bin`` in the MBR,
  which chains the partition marked *legacy BIOS bootable* (GPT attribute bit 2), whose boot
  sector ``syslinux --install`` wrote. Both loaders read the same kernel and initrd from the FAT
  file system, and both are installed on an image *file* with mtools: no mounts, no loop
  devices, no root. GRUB would need a BIOS boot partition and ``grub-bios-setup``, which wants
  a block device. Trade-off: a kernel upgraded inside the guest is not copied to the ESP (the
  image is a test stand-in for a user's cloud image, not a distribution installer).
* **Network by systemd-networkd**, matched by name glob, so any NIC name (``ens3``,
  ``enp0s2``, ``eth0``) gets DHCP even without cloud-init's help; cloud-init renders its own
  config for networkd too. ``systemd-networkd-wait-online`` waits for *any* link, at most a few
  seconds, so a NIC without a DHCP server cannot stall boot for minutes.
* **cloud-init looks only for NoCloud** (then ``None``): probing cloud metadata services would
  stall boot on a network that has none.
* **No host keys in the image**: cloud-init makes them per instance; ``ssh-keygen -A`` in
  ``ssh.service`` covers a boot without cloud-init.
* **No apt timers**: a test guest must not wake up and download or unpack packages in the
  middle of a measurement.
* **Fast under emulation**: ed25519 and ECDSA host keys only (an RSA key costs seconds under
  TCG; user-data can ask for it), no ``e2scrub_reap``, no menus or timeouts in the loaders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

__all__ = [
    "BOOT_LOADER_FILES",
    "CONFIG_FILES",
    "DEFAULT_USER",
    "DISK",
    "DPKG_OPTIONS",
    "ENABLE_UNITS",
    "KERNEL_COMMAND_LINE",
    "MASK_UNITS",
    "PACKAGES",
    "QCOW2_OPTIONS",
    "SUITE",
    "VARIANT",
    "ConfigFile",
    "DiskLayout",
    "recipe_hash",
]

#: Bump when the builder's steps change in a way the data below does not capture.
BUILDER_VERSION = 1

SUITE = "bookworm"
VARIANT = "minbase"

#: On top of ``minbase`` (no Recommends: mmdebstrap does not install them). ``dbus`` because
#: cloud-init sets the host name with ``hostnamectl``; ``sudo`` for cloud-init's default user;
#: ``cloud-guest-utils`` so cloud-init grows the root partition to the volume's size.
PACKAGES: tuple[str, ...] = (
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "systemd-sysv",
    "udev",
    "dbus",
    "systemd-resolved",
    "openssh-server",
    "cloud-init",
    "cloud-guest-utils",
    "e2fsprogs",
    "sudo",
)

#: Documentation is not installed (only copyright files): a smaller image, a faster build.
DPKG_OPTIONS: tuple[str, ...] = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)

#: The user cloud-init creates and gives the ``ssh_authorized_keys`` (Debian's cloud.cfg).
DEFAULT_USER = "debian"


@dataclass(frozen=True)
class DiskLayout:
    """The GPT disk: ESP first (also the BIOS boot partition), then the root file system.

    Identifiers are fixed so the same recipe gives the same disk, and so the kernel finds its
    root by UUID without reading the partition table from the builder.
    """

    disk_bytes: int = 2 << 30
    sector: int = 512
    esp_start_mib: int = 1
    esp_mib: int = 127
    root_start_mib: int = 128
    tail_mib: int = 1  # keeps the root partition clear of the backup GPT, MiB-aligned
    disk_guid: str = "6c69766d-6967-4000-8000-646973630001"
    esp_partuuid: str = "6c69766d-6967-4000-8000-657370000001"
    root_partuuid: str = "6c69766d-6967-4000-8000-726f6f740001"
    root_fs_uuid: str = "6c69766d-6967-4000-8000-726f6f746673"
    root_label: str = "root"
    esp_volume_id: str = "4c4d4553"  # FAT serial number, eight hex digits
    esp_label: str = "ESP"

    @property
    def root_mib(self) -> int:
        return (self.disk_bytes >> 20) - self.root_start_mib - self.tail_mib


DISK = DiskLayout()

#: The published qcow2 is compressed with zstd: five times faster to write than zlib here and
#: no bigger; QEMU reads it since 5.1 (Debian 12 has 7.2), older readers refuse it cleanly.
QCOW2_OPTIONS = "compression_type=zstd"

#: ``console=ttyS0`` last, so it is ``/dev/console``: boot logs and systemd status reach the
#: serial port (the only window into a guest without a display).
KERNEL_COMMAND_LINE = f"root=UUID={DISK.root_fs_uuid} ro console=tty0 console=ttyS0,115200n8"


@dataclass(frozen=True)
class ConfigFile:
    """A file written into the root file system (owned by root)."""

    path: str
    content: str
    mode: int = 0o644


CONFIG_FILES: tuple[ConfigFile, ...] = (
    ConfigFile("/etc/hostname", "debian\n"),
    ConfigFile(
        "/etc/hosts",
        "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n",
    ),
    ConfigFile(
        "/etc/fstab",
        f"# <file system>\t<mount point>\t<type>\t<options>\t<dump>\t<pass>\n"
        f"UUID={DISK.root_fs_uuid}\t/\text4\tdefaults,errors=remount-ro\t0\t1\n",
    ),
    # With the system locale set, cloud-init's locale module has nothing to generate.
    ConfigFile("/etc/default/locale", "LANG=C.UTF-8\n"),
    ConfigFile(
        "/etc/cloud/cloud.cfg.d/90_livemig.cfg",
        "# livemig disk image: NoCloud only (no metadata service to probe), networkd renders the network.\n"
        "datasource_list: [ NoCloud, None ]\n"
        "system_info:\n"
        "  network:\n"
        "    renderers: [ networkd ]\n"
        "    activators: [ networkd ]\n"
        "grub_dpkg:\n"
        "  enabled: false\n"
        "# RSA host keys take seconds to make under emulation; clients prefer these two anyway.\n"
        "ssh_genkeytypes: [ ed25519, ecdsa ]\n",
    ),
    ConfigFile(
        "/etc/systemd/network/90-dhcp-ethernet.network",
        "# Any physical Ethernet NIC, whatever its name, gets DHCP unless cloud-init wrote a\n"
        "# more specific file (10-cloud-init-*.network sorts first and wins).\n"
        "[Match]\nType=ether\nKind=!*\n\n[Network]\nDHCP=ipv4\n",
    ),
    ConfigFile(
        "/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf",
        "# One configured link is enough, and a NIC without a DHCP server must not stall boot.\n"
        "[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=10\n",
    ),
    ConfigFile(
        "/etc/systemd/system/ssh.service.d/host-keys.conf",
        "# The image ships no host keys; cloud-init makes them, and this covers a boot without it\n"
        "# (one ed25519 key: `ssh-keygen -A` would add the RSA key cloud-init leaves out on purpose).\n"
        "[Service]\nExecStartPre=\n"
        "ExecStartPre=/bin/sh -c 'test -e /etc/ssh/ssh_host_ed25519_key || "
        'exec /usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key\'\n'
        "ExecStartPre=/usr/sbin/sshd -t\n",
    ),
)

ENABLE_UNITS: tuple[str, ...] = ("systemd-networkd.service",)
#: e2scrub_reap only cleans up after LVM snapshots (there is no LVM) and costs seconds of boot.
MASK_UNITS: tuple[str, ...] = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_reap.service")

#: Boot loader configuration on the ESP (FAT path -> content). systemd-boot: no menu, no editor;
#: syslinux: no prompt, its console on the first serial port too.
BOOT_LOADER_FILES: dict[str, str] = {
    "loader/loader.conf": "default debian.conf\ntimeout 0\neditor no\n",
    "loader/entries/debian.conf": (
        f"title Debian GNU/Linux 12\nlinux /vmlinuz\ninitrd /initrd.img\noptions {KERNEL_COMMAND_LINE}\n"
    ),
    "syslinux/syslinux.cfg": (
        "SERIAL 0 115200\nPROMPT 0\nTIMEOUT 0\nDEFAULT debian\n\n"
        f"LABEL debian\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {KERNEL_COMMAND_LINE}\n"
    ),
}


def recipe_hash(extra: dict[str, str] | None = None) -> str:
    """A short hash of everything above, plus ``extra`` (e.g. digests of the loader binaries).

    Sixteen hex digits: a cache directory name, not a security boundary.
    """
    recipe = {
        "builder": BUILDER_VERSION,
        "suite": SUITE,
        "variant": VARIANT,
        "packages": list(PACKAGES),
        "dpkg": list(DPKG_OPTIONS),
        "user": DEFAULT_USER,
        "disk": asdict(DISK),
        "qcow2": QCOW2_OPTIONS,
        "cmdline": KERNEL_COMMAND_LINE,
        "files": [asdict(f) for f in CONFIG_FILES],
        "enable": list(ENABLE_UNITS),
        "mask": list(MASK_UNITS),
        "loader": BOOT_LOADER_FILES,
        "extra": extra or {},
    }
    encoded = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]
