"""A user's own VM, end to end: a Debian disk image imported into a blockd volume boots under
real firmware (OVMF with its NVRAM on a volume, and SeaBIOS), cloud-init configures it from its
seed volume, it gets its address by DHCP from the vswitch, and SSH reaches it through the VCN.
It then migrates live with an SSH session running, and its NVRAM moves with it.

Why these tests, and only these, boot the distribution image: they cover what the plain-QEMU
checks of the image proved (UEFI variables and files survive a reboot, the boot order holds,
SeaBIOS boots the same disk, cloud-init grows the root file system into a larger disk, RAM off
QEMU's 256 KiB grid as hostd gives TCG guests) and then what livemig adds. The image is built
once per machine into the cache (``livemig image build-disk``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemig import errors
from livemig.cli.transfer import nbd_client_tls
from livemig.control.store import Store
from livemig.guest.distro import DiskImage, build_disk_image
from livemig.guest.image import default_cache_dir
from livemig.model import Phase, VmSpec
from livemig.model.vm import NVRAM_SLOT
from livemig.region.local import Region
from livemig.storage.images import write_volume
from livemig.wire import lmo as wire_lmo
from livemig.wire.lmo import LmoClient

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="the VCN gateway needs root"),
    pytest.mark.skipif(not Path("/usr/share/OVMF/OVMF_CODE_4M.fd").exists(), reason="the ovmf package is missing"),
]
TAG = os.getpid() % 100000
SUBNET = f"own{TAG}"
GATEWAY_IP, UEFI_IP, BIOS_IP = "10.0.7.2", "10.0.7.10", "10.0.7.11"
SSH_TIMEOUT = 420.0  # about a minute on an idle TCG machine; shared CI machines are slower
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
TEST_VENDOR = "8b1b0b7e-3b43-4c43-9a4e-6c6976656d67"  # the test's own EFI variable namespace
MIB = 1 << 20


def cli(region: Region, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig.cli.main", *argv, "--state-dir", str(region.state_dir)],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def disk_image() -> DiskImage:
    return build_disk_image(default_cache_dir())


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("sshkey") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "livemig-e2e", "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="module")
def vcn(region: Region) -> Iterator[LmoClient]:
    """A subnet with the guests' VNICs, and a gateway namespace into it made by ``livemig net gateway``."""
    from livemig.region.netplumb import delete_netns

    config = region.load()
    assert config is not None
    with LmoClient(config.lmo_url) as lmo:
        put = lmo.put_network_object
        put("vcns", {"id": f"ownvcn{TAG}", "cidr": "10.0.0.0/16", "vni": 700 + TAG % 1000})
        put("subnets", {"id": SUBNET, "vcn": f"ownvcn{TAG}", "cidr": "10.0.7.0/24", "gateway": "10.0.7.1"})
        put("security-lists", {"id": "ssh-in", "rules": [
            {"direction": "ingress", "protocol": "tcp", "cidr": "10.0.7.0/24", "dst_ports": {"min": 22, "max": 22}},
            {"direction": "egress", "protocol": "all", "cidr": "0.0.0.0/0"},
        ]})  # fmt: skip
        put("security-lists", {"id": "open", "rules": [
            {"direction": "ingress", "protocol": "all", "cidr": "0.0.0.0/0"},
            {"direction": "egress", "protocol": "all", "cidr": "0.0.0.0/0"},
        ]})  # fmt: skip
        put("vnics", {"id": "gw", "mac": "52:54:00:07:00:02", "ip": GATEWAY_IP, "subnet": SUBNET,
                      "security_lists": ["open"], "host": "A"})  # fmt: skip
        for vnic, mac, ip in (("uefi", "10", UEFI_IP), ("bios", "11", BIOS_IP)):
            put("vnics", {"id": vnic, "mac": f"52:54:00:07:00:{mac}", "ip": ip, "subnet": SUBNET,
                          "security_lists": ["ssh-in"], "host": ""})  # fmt: skip
        opened = cli(region, "net", "gateway", "gw")
        assert opened.returncode == 0, opened.stderr
        assert f"namespace lmgw-{SUBNET}" in " ".join(opened.stdout.split())
        try:
            yield lmo
        finally:
            delete_netns(f"lmgw-{SUBNET}")


class Guest:
    """A VM on the VCN reached with ``livemig vm ssh`` (the command a user runs)."""

    def __init__(self, region: Region, lmo: LmoClient, name: str, key: Path) -> None:
        self.region, self.lmo, self.name, self.key = region, lmo, name, key

    def ssh_argv(self, command: str) -> list[str]:
        return [sys.executable, "-m", "livemig.cli.main", "vm", "ssh", self.name, "-i", str(self.key),
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=12", "--state-dir", str(self.region.state_dir), "--", command]  # fmt: skip

    def ssh(self, command: str, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.ssh_argv(command), capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"ssh {command!r} failed ({result.returncode}): {result.stderr.strip()}\n"
                                 f"console:\n{self.lmo.console(self.name, tail=30)}")  # fmt: skip
        return result

    def wait_for_ssh(self, timeout: float = SSH_TIMEOUT, not_boot: str | None = None) -> float:
        """Seconds until a login answers (with a boot id other than ``not_boot``, after a reboot)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            with_timeout = self.ssh("cat /proc/sys/kernel/random/boot_id", check=False, timeout=40)
            if with_timeout.returncode == 0 and with_timeout.stdout.strip() not in ("", not_boot):
                return time.monotonic() - start
            time.sleep(2)
        raise AssertionError(f"no SSH login within {timeout:.0f}s; {self.state()}; console:\n"
                             f"{self.lmo.console(self.name, tail=40)}")  # fmt: skip

    def state(self) -> str:
        """How the VM's host sees it (QEMU's run state, or why it cannot say): a guest that does
        not answer is told apart from a QEMU that does not."""
        try:
            view = self.lmo.vm(self.name)
        except errors.LivemigError as exc:
            return f"the LMO cannot show it: {exc.message}"
        if view.observed is None:
            return f"on {view.host}: {view.error}"
        threads = ""
        if view.observed.pid is not None and shutil.which("gdb"):  # where a QEMU that hangs waits
            dump = subprocess.run(["gdb", "-p", str(view.observed.pid), "-batch", "-ex", "thread apply all bt 12"],
                                  capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
            threads = "\nQEMU's threads:\n" + "\n".join(line for line in dump.stdout.splitlines()
                                                         if line.startswith(("Thread", "#")))  # fmt: skip
        return (
            f"on {view.host}: QEMU {view.observed.state.value}, pid {view.observed.pid}, "
            f"guest resets {view.observed.guest_resets}{threads}"
        )

    def boot_id(self) -> str:
        return self.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()

    def uptime(self) -> float:
        return float(self.ssh("cut -d' ' -f1 /proc/uptime").stdout)

    def efi_var(self, name: str) -> str:
        """A UEFI variable as hex (4 attribute bytes, then its data); '' if it does not exist."""
        path = f"/sys/firmware/efi/efivars/{name}"
        return self.ssh(f"test -e {path} && od -An -v -tx1 {path} | tr -d ' \\n' || true").stdout.strip()


def create_guest(region: Region, lmo: LmoClient, key: Path, *, name: str, firmware: str, volume: str,
                 vnic: str) -> Guest:  # fmt: skip
    """The VM, created the way the README says: ``livemig vm create NAME --boot-volume ...``."""
    created = cli(region, "vm", "create", name, "--boot-volume", volume, "--firmware", firmware, "--vnic", vnic,
                  "--ssh-key", str(key.with_suffix(".pub")), "--memory", "256", "--host", "A")  # fmt: skip
    assert created.returncode == 0, created.stderr
    spec = lmo.vm(name).spec
    assert spec.firmware is not None and spec.firmware.kind == firmware and spec.cloud_init is not None
    return Guest(region, lmo, name, key)


def assert_configured(guest: Guest, ip: str) -> None:
    """cloud-init ran from the seed volume: host name, key (we logged in), DHCP from the vswitch."""
    assert guest.ssh("hostname").stdout.strip() == guest.name
    status = guest.ssh("cloud-init status --wait", check=False, timeout=300)
    assert status.returncode == 0 and "status: done" in status.stdout, (status.stdout, status.stderr)
    addresses = guest.ssh("ip -4 -o addr show scope global").stdout
    assert re.search(rf"inet {re.escape(ip)}/24 .*dynamic", addresses), addresses  # a lease, from the vswitch
    nic_mtus = guest.ssh('for n in /sys/class/net/*; do [ "${n##*/}" = lo ] || cat "$n/mtu"; done').stdout.split()
    assert nic_mtus == ["1450"], nic_mtus  # the one NIC, at the VCN's MTU (the loopback left out)


def migrate(lmo: LmoClient, vm: str, destination: str) -> None:
    m = lmo.wait(lmo.migrate(vm, destination).id, timeout=600)
    assert m.phase is Phase.SUCCEEDED, m.reason
    print(f"\n{vm} -> {destination}: pause {m.stats.pause_ms} ms, total {m.stats.total_ms} ms")


class Ticker:
    """A long-running command on one SSH session; its lines are collected as they arrive."""

    def __init__(self, guest: Guest) -> None:
        self.proc = subprocess.Popen(guest.ssh_argv("i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.ticks: list[tuple[float, int]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("tick "):
                self.ticks.append((time.monotonic(), int(line.split()[1])))

    def count_after(self, moment: float) -> int:
        return sum(1 for at, _ in self.ticks if at > moment)

    def wait_for(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ticks) < n:
            assert self.proc.poll() is None, (
                f"the SSH session ended: {self.proc.stderr.read() if self.proc.stderr else ''}"
            )
            assert time.monotonic() < deadline, "the long-running command stopped printing"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=20)


def import_image(region: Region, volume: str, image: DiskImage, *extra: str) -> None:
    done = cli(region, "volume", "import", volume, str(image.path), *extra)
    assert done.returncode == 0, done.stderr
    print(" ".join(done.stdout.split()))


def test_uefi_guest_migrates_with_its_nvram_its_ssh_session_and_its_uptime(region, vcn, disk_image, ssh_key, tmp_path):
    lmo = vcn
    import_image(region, "own-uefi-root", disk_image)
    guest = create_guest(region, lmo, ssh_key, name="own-uefi", firmware="uefi", volume="own-uefi-root",
                         vnic="uefi")  # fmt: skip
    try:
        print(f"\nUEFI boot from the blockd volume to SSH: {guest.wait_for_ssh():.1f}s")
        assert_configured(guest, UEFI_IP)
        assert guest.ssh("test -d /sys/firmware/efi", check=False).returncode == 0, "booted through UEFI"
        mounts = guest.ssh("findmnt -n -o FSTYPE,OPTIONS /sys/firmware/efi/efivars").stdout
        assert mounts.startswith("efivarfs") and re.search(r"(^|,|\s)rw(,|$)", mounts), mounts
        boot_order = guest.efi_var(f"BootOrder-{EFI_GLOBAL}")
        assert boot_order, "OVMF set no BootOrder"
        mem_kib = int(guest.ssh("awk '/^MemTotal:/ {print $2}' /proc/meminfo").stdout)
        assert 0 < mem_kib < 256 * 1024 - 8, "hostd's TCG trim: RAM off the 256 KiB grid"

        variable, payload = f"LivemigTest-{TEST_VENDOR}", os.urandom(8).hex()
        guest.ssh("sudo python3 -c \"import sys; open(sys.argv[1], 'wb').write(b'\\x07\\x00\\x00\\x00' + "
                  f"sys.argv[2].encode())\" /sys/firmware/efi/efivars/{variable} {payload}")  # fmt: skip
        expected = "07000000" + payload.encode().hex()  # NV | BOOTSERVICE | RUNTIME, then the data
        assert guest.efi_var(variable) == expected
        guest.ssh(f"echo {payload} | sudo tee /var/lib/livemig-proof >/dev/null && sync")
        first_boot, uptime_before = guest.boot_id(), guest.uptime()

        ticker = Ticker(guest)
        try:
            ticker.wait_for(10)
            # hold the migration after cut-over, to write through the source's NVRAM attachment
            region.restart_lmo(faults="controller.before.Cleanup=hold")
            migration = lmo.migrate("own-uefi", "B")
            deadline = time.monotonic() + 600
            while (current := lmo.migration(migration.id)).phase is not Phase.CLEANUP:
                assert not current.terminal and time.monotonic() < deadline, (current.phase, current.reason)
                time.sleep(0.2)
            nvram = "own-uefi.nvram"
            store = Store(f"sqlite:///{region.state_dir / 'lmo.db'}")
            stale = store.attachments("own-uefi", "A")[NVRAM_SLOT]
            late = tmp_path / "late-flash-write"
            late.write_bytes(b"late flash write from the old host".ljust(512, b"\0"))
            # as a client blockd admits over TLS (the region's LMO certificate): fencing refuses it
            with (
                nbd_client_tls(stale, region.state_dir) as tls,
                pytest.raises(errors.LivemigError, match="not permitted"),
            ):
                write_volume(stale, late, tls)
            on_a = next(a for a in lmo.volume(nvram).attachments if a.host == "A")
            assert on_a.fenced and on_a.rejected_writes >= 1, on_a
            on_b = next(a for a in lmo.volume(nvram).attachments if a.host == "B")
            assert on_b.is_writer, "the destination rewrote the store at resume and owns it"
            region.restart_lmo()
            final = lmo.wait(migration.id, timeout=120)
            assert final.phase is Phase.SUCCEEDED, final.reason
            print(f"own-uefi -> B: pause {final.stats.pause_ms} ms, total {final.stats.total_ms} ms")
            moved = time.monotonic()
            ticker.wait_for(len(ticker.ticks) + 10)
            assert ticker.proc.poll() is None, "the SSH session stayed open"
            assert ticker.count_after(moved) >= 10, "the command kept printing after the migration"
            numbers = [n for _, n in ticker.ticks]
            assert numbers == list(range(1, len(numbers) + 1)), "no line lost or repeated"
        finally:
            ticker.stop()
        assert lmo.vm("own-uefi").host == "B"
        assert guest.boot_id() == first_boot and guest.uptime() > uptime_before, "the guest did not reboot"
        assert [a.host for a in lmo.volume(nvram).attachments] == ["B"], "A's attachment was detached at Cleanup"

        guest.ssh("sudo systemctl reboot", check=False, timeout=30)
        print(f"reboot on B to SSH: {guest.wait_for_ssh(not_boot=first_boot):.1f}s")
        assert guest.efi_var(variable) == expected, "the EFI variable survived the migration and the reboot"
        assert guest.ssh("cat /var/lib/livemig-proof").stdout.strip() == payload
        assert guest.efi_var(f"BootOrder-{EFI_GLOBAL}") == boot_order, "the boot order is unchanged"
        assert guest.ssh("hostname").stdout.strip() == "own-uefi"

        migrate(lmo, "own-uefi", "A")
        assert guest.efi_var(variable) == expected and lmo.vm("own-uefi").host == "A"
    finally:
        lmo.delete_vm("own-uefi")
        lmo.delete_volume("own-uefi-root")
    left = {v.name for v in lmo.run(wire_lmo.volumes())}
    assert not left & {"own-uefi.nvram", "own-uefi.cidata"}, "the VM's own volumes go with it"


def test_bios_guest_boots_the_same_image_on_a_larger_volume_and_migrates(region, vcn, disk_image, ssh_key):
    lmo = vcn
    size_mib = disk_image.virtual_size // MIB + 1024  # a volume 1 GiB larger than the image
    import_image(region, "own-bios-root", disk_image, "--size-mib", str(size_mib))
    guest = create_guest(region, lmo, ssh_key, name="own-bios", firmware="bios", volume="own-bios-root",
                         vnic="bios")  # fmt: skip
    try:
        print(f"\nSeaBIOS boot from the blockd volume to SSH: {guest.wait_for_ssh():.1f}s")
        assert guest.ssh("test -d /sys/firmware/efi", check=False).returncode == 1, "booted through BIOS"
        assert_configured(guest, BIOS_IP)
        root_bytes = int(guest.ssh("df -B1 --output=size / | tail -1").stdout)
        assert root_bytes > disk_image.virtual_size * 0.9, f"cloud-init did not grow the root: {root_bytes} bytes"
        names = {v.name for v in lmo.run(wire_lmo.volumes())}
        assert "own-bios.cidata" in names and "own-bios.nvram" not in names, "a BIOS VM has no NVRAM volume"
        first_boot = guest.boot_id()
        migrate(lmo, "own-bios", "B")
        assert guest.boot_id() == first_boot and guest.ssh("hostname").stdout.strip() == "own-bios"
    finally:
        lmo.delete_vm("own-bios")
        lmo.delete_volume("own-bios-root")


def test_a_destination_with_another_ovmf_build_is_refused(region, vcn, tmp_path):
    """B runs another build of OVMF: ``migrate --dry-run`` and ``POST /migrations`` refuse it."""
    lmo = vcn
    other = tmp_path / "ovmf"
    shutil.copytree("/usr/share/OVMF", other, symlinks=True)
    code = bytearray((other / "OVMF_CODE_4M.fd").read_bytes())
    code[-1] ^= 0xFF  # another build: one byte differs
    (other / "OVMF_CODE_4M.fd").write_bytes(bytes(code))
    lmo.create_volume("own-blank", 1)  # a VM is enough: OVMF starts and finds nothing to boot
    lmo.create_vm(VmSpec.model_validate({
        "name": "own-blank", "memory_mib": 128, "firmware": "uefi",
        "devices": [{"kind": "volume", "id": "root", "pci_addr": "0x4", "volume": "own-blank", "boot_index": 0}],
    }), host="A")  # fmt: skip
    config = region.load()
    assert config is not None
    b = next(h for h in config.hosts if h.name == "B")
    try:
        region.kill_host("B")
        b.ovmf_dir = str(other)
        region._save(config)
        region.restart_host("B")
        dry = cli(region, "migrate", "own-blank", "--to", "B", "--dry-run", "--json")
        assert dry.returncode == 1, dry.stdout + dry.stderr
        assert '"name": "firmware"' in dry.stdout and "host B has another ovmf-4m build" in dry.stdout
        with pytest.raises(
            errors.InvalidRequest, match=r"firmware: host B has another ovmf-4m build .* mismatched code"
        ):
            lmo.migrate("own-blank", "B")
        assert lmo.migrations(vm="own-blank") == []
    finally:
        region.kill_host("B")
        b.ovmf_dir = None
        region._save(config)
        region.restart_host("B")
        lmo.delete_vm("own-blank")
        lmo.delete_volume("own-blank")


def test_secure_boot_vm_runs_ovmf_with_smm_and_enrolled_keys(region, vcn):
    """Secure Boot is an option of the spec: OVMF's SMM build, the secure flash, Microsoft's keys."""
    lmo = vcn
    lmo.create_volume("own-sb", 1)
    try:
        view = lmo.create_vm(VmSpec.model_validate({
            "name": "own-sb", "memory_mib": 128, "firmware": {"kind": "uefi", "secure_boot": True},
            "devices": [{"kind": "volume", "id": "root", "pci_addr": "0x4", "volume": "own-sb", "boot_index": 0}],
        }), host="A")  # fmt: skip
        assert view.spec.firmware is not None and view.spec.firmware.build == "ovmf-4m-secboot"
        assert view.observed is not None and view.observed.pid is not None
        cmdline = Path(f"/proc/{view.observed.pid}/cmdline").read_bytes().decode().split("\0")
        assert any("pflash1=fw_vars,smm=on" in arg for arg in cmdline), cmdline
        assert "driver=cfi.pflash01,property=secure,value=on" in cmdline
        assert any("OVMF_CODE_4M.secboot.fd" in arg for arg in cmdline)
        time.sleep(5)  # OVMF runs its SMM setup; a refused flash layout would stop QEMU
        observed = lmo.vm("own-sb").observed
        assert observed is not None and observed.state.value == "running", observed
    finally:
        lmo.delete_vm("own-sb")
        lmo.delete_volume("own-sb")
