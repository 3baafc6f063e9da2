"""The Debian disk image boots under OVMF and SeaBIOS, and cloud-init configures it.

Why end to end: the image stands in for a user's cloud image, so what matters is what a user
sees: the firmware finds a loader on the disk, the kernel finds its root, cloud-init reads the
NoCloud seed (host name, SSH key, DHCP), and UEFI variables written from inside the guest
survive a reboot (they live in the per-VM variable store, which livemig will migrate). Each
test boots a qcow2 overlay on the cached image (never the cache file itself), under plain QEMU
with TCG, and logs in with the system ``ssh`` client: the same client a user would use, and
one binary instead of an SSH library in the project's dependencies for a test helper.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from livemig.guest.cidata import build_cidata
from livemig.guest.distro import DiskImage, build_disk_image
from livemig.region.freeport import free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"),
]

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SSH_TIMEOUT = 420.0  # about a minute on an idle TCG machine; CI machines are shared and slower
MEMORY = "512M"
#: livemig's hostd trims 8 KiB off guest RAM under TCG (QEMU 7.2 dirty-sync bug): 512 MiB - 8 KiB.
TRIMMED_MEMORY = "524280K"
#: A vendor GUID for the test's own EFI variable (random, used for nothing else).
TEST_VENDOR = "8b1b0b7e-3b43-4c43-9a4e-6c6976656d67"
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"


def image_cache() -> Path:
    return Path(os.environ.get("LIVEMIG_CACHE") or Path.home() / ".cache" / "livemig")


@pytest.fixture(scope="module")
def disk_image() -> DiskImage:
    return build_disk_image(image_cache())


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sshkey")
    key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "livemig-test", "-f", str(key)], check=True)
    return key


class DistroGuest:
    """One QEMU running the image (overlay), its seed and a forwarded SSH port; serial to a file."""

    def __init__(self, workdir: Path, image: DiskImage, key: Path, *, hostname: str, firmware: str,
                 memory: str = MEMORY, disk_size: int | None = None) -> None:  # fmt: skip
        self.workdir = workdir
        self.key = key
        self.user = image.default_user
        self.port = free_port()
        self.console = workdir / "console.log"
        self.vars = workdir / "OVMF_VARS_4M.fd"
        overlay = workdir / "disk.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.path), str(overlay)]
            + ([str(disk_size)] if disk_size else []),
            check=True,
        )
        seed = build_cidata(
            workdir / "seed.img",
            hostname=hostname,
            ssh_public_keys=[key.with_suffix(".pub").read_text()],
            instance_id=f"i-{hostname}",
        )
        machine = "q35"
        argv = [QEMU, "-accel", "tcg", "-cpu", "qemu64", "-m", memory, "-nodefaults", "-display", "none"]
        if firmware == "uefi":
            shutil.copyfile(OVMF_VARS, self.vars)
            argv += [
                "-blockdev", f"node-name=ovmf-code,driver=file,filename={OVMF_CODE},read-only=on",
                "-blockdev", f"node-name=ovmf-vars,driver=file,filename={self.vars}",
            ]  # fmt: skip
            machine += ",pflash0=ovmf-code,pflash1=ovmf-vars"
        elif firmware != "bios":
            raise ValueError(firmware)
        argv += [
            "-machine", machine,
            "-blockdev", f"driver=qcow2,node-name=disk,file.driver=file,file.filename={overlay}",
            "-device", "virtio-blk-pci,drive=disk,bootindex=1",
            "-blockdev", f"driver=raw,node-name=seed,read-only=on,file.driver=file,file.filename={seed}",
            "-device", "virtio-blk-pci,drive=seed",
            # restrict=on: the guest reaches nothing beyond slirp's DHCP; the forward still works
            "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", "virtio-net-pci,netdev=net0,romfile=",
            "-chardev", f"file,id=serial0,path={self.console}",
            "-serial", "chardev:serial0",
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def ssh(self, command: str, *, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        argv = [
            "ssh", "-q", "-i", str(self.key), "-p", str(self.port),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            f"{self.user}@127.0.0.1", command,
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"ssh {command!r} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def wait_for_ssh(self, timeout: float = SSH_TIMEOUT) -> float:
        """Seconds from now until an SSH login runs a command; fails with the console's tail."""
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode}): {self._qemu_output()}\n{self.tail()}")
            try:
                if self.ssh("true", check=False, timeout=30).returncode == 0:
                    return time.monotonic() - start
            except subprocess.TimeoutExpired:
                pass
            time.sleep(2)
        raise AssertionError(f"no SSH login within {timeout:.0f}s; console ends with:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_bytes().decode(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def _qemu_output(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.read().decode(errors="replace").strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


Boot = Callable[..., DistroGuest]


@pytest.fixture
def boot(tmp_path: Path, disk_image: DiskImage, ssh_key: Path) -> Iterator[Boot]:
    guests: list[DistroGuest] = []

    def start(hostname: str, firmware: str, memory: str = MEMORY, disk_size: int | None = None) -> DistroGuest:
        guest = DistroGuest(
            tmp_path, disk_image, ssh_key, hostname=hostname, firmware=firmware, memory=memory, disk_size=disk_size
        )
        guests.append(guest)
        return guest

    yield start
    for guest in guests:
        guest.stop()


def boot_id(guest: DistroGuest) -> str:
    return guest.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()


def efi_var_hex(guest: DistroGuest, name: str) -> str:
    """A UEFI variable as hex (4 attribute bytes, then the data); '' if it does not exist."""
    path = f"/sys/firmware/efi/efivars/{name}"
    return guest.ssh(f"test -e {path} && od -An -v -tx1 {path} | tr -d ' \\n' || true").stdout.strip()


def assert_configured_by_cloud_init(guest: DistroGuest, hostname: str) -> None:
    assert guest.ssh("hostname").stdout.strip() == hostname
    status = guest.ssh("cloud-init status --wait", check=False, timeout=300)
    assert status.returncode == 0 and "status: done" in status.stdout, (status.stdout, status.stderr)
    # The address came from slirp's DHCP server: a finite lease ("dynamic"), on the NIC cloud-init matched.
    addresses = guest.ssh("ip -4 -o addr show scope global").stdout
    assert re.search(r"inet 10\.0\.2\.15/24 .*dynamic", addresses), addresses
    networkd = guest.ssh("networkctl list --no-legend").stdout
    assert re.search(r"\ben\w+\s+ether\s+routable\s+configured", networkd), networkd


def test_boots_under_ovmf_and_nvram_survives_reboot(boot: Boot, disk_image: DiskImage) -> None:
    """OVMF 4M + its own vars store: SSH in, write an EFI variable and a file, reboot, both remain."""
    hostname = "lm-distro-uefi"
    guest: DistroGuest = boot(hostname, "uefi")
    seconds = guest.wait_for_ssh()
    print(f"\nOVMF boot to SSH: {seconds:.1f}s")
    assert_configured_by_cloud_init(guest, hostname)

    mounts = guest.ssh("findmnt -n -o FSTYPE,OPTIONS /sys/firmware/efi/efivars").stdout
    assert mounts.startswith("efivarfs") and re.search(r"(^|,|\s)rw(,|$)", mounts), mounts
    boot_order = efi_var_hex(guest, f"BootOrder-{EFI_GLOBAL}")
    assert boot_order, "OVMF set no BootOrder"

    name = f"LivemigTest-{TEST_VENDOR}"
    payload = os.urandom(8).hex()
    # attributes NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS, then the data, in one write()
    guest.ssh(
        "sudo python3 -c \"import sys; open(sys.argv[1], 'wb').write(b'\\x07\\x00\\x00\\x00' + sys.argv[2].encode())\" "
        f"/sys/firmware/efi/efivars/{name} {payload}"
    )
    expected = "07000000" + payload.encode().hex()
    assert efi_var_hex(guest, name) == expected
    guest.ssh(f"echo {payload} | sudo tee /var/lib/livemig-proof >/dev/null && sync")
    first_boot = boot_id(guest)

    guest.ssh("sudo systemctl reboot", check=False, timeout=30)
    started = time.monotonic()
    while True:  # wait for the old system to go away, then for the new one
        assert time.monotonic() - started < SSH_TIMEOUT, f"no reboot; console:\n{guest.tail()}"
        guest.wait_for_ssh(SSH_TIMEOUT - (time.monotonic() - started))
        now = guest.ssh("cat /proc/sys/kernel/random/boot_id", check=False)  # may race the shutdown
        if now.returncode == 0 and now.stdout.strip() not in ("", first_boot):
            break
        time.sleep(2)
    print(f"OVMF reboot to SSH: {time.monotonic() - started:.1f}s")

    assert efi_var_hex(guest, name) == expected, "the EFI variable did not survive the reboot"
    assert guest.ssh("cat /var/lib/livemig-proof").stdout.strip() == payload
    assert efi_var_hex(guest, f"BootOrder-{EFI_GLOBAL}") == boot_order, "the UEFI boot order changed"
    assert guest.ssh("hostname").stdout.strip() == hostname
    # The variable reached the flash backend, the per-VM file livemig will keep on a volume.
    assert name.split("-", 1)[0].encode("utf-16-le") in guest.vars.read_bytes()


def test_boots_under_seabios_and_grows_into_a_bigger_disk(boot: Boot, disk_image: DiskImage) -> None:
    """The same image through SeaBIOS (gptmbr.bin -> syslinux on the legacy-bootable ESP), on a
    disk 1 GiB larger than the image, as a volume bigger than the image will be: cloud-init grows
    the root partition and file system into it."""
    hostname = "lm-distro-bios"
    guest: DistroGuest = boot(hostname, "bios", disk_size=disk_image.virtual_size + (1 << 30))
    seconds = guest.wait_for_ssh()
    print(f"\nSeaBIOS boot to SSH: {seconds:.1f}s")
    assert guest.ssh("test -d /sys/firmware/efi", check=False).returncode == 1, "booted through UEFI, not BIOS"
    assert_configured_by_cloud_init(guest, hostname)
    root_bytes = int(guest.ssh("df -B1 --output=size / | tail -1").stdout)
    assert root_bytes > disk_image.virtual_size * 0.9, f"root file system not grown: {root_bytes} bytes"


def test_boots_under_ovmf_with_trimmed_ram(boot: Boot) -> None:
    """OVMF with RAM off the 256 KiB grid, as hostd gives TCG guests (8 KiB less)."""
    hostname = "lm-distro-trim"
    guest: DistroGuest = boot(hostname, "uefi", TRIMMED_MEMORY)
    seconds = guest.wait_for_ssh()
    print(f"\nOVMF (RAM {TRIMMED_MEMORY}) boot to SSH: {seconds:.1f}s")
    assert guest.ssh("test -d /sys/firmware/efi", check=False).returncode == 0
    assert guest.ssh("hostname").stdout.strip() == hostname
    mem_total_kib = int(guest.ssh("awk '/^MemTotal:/ {print $2}' /proc/meminfo").stdout)
    assert 0 < mem_total_kib < 524280
