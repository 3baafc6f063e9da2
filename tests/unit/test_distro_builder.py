"""The Debian disk image builder's logic, without mmdebstrap or QEMU.

Why: the cache must return a built image at once and must *not* return it once the recipe
changed; a missing tool must fail in a second with the apt-get line, not minutes into a build;
the disk layout and boot loader configuration must agree with each other (a root UUID typo
only shows up as a guest that cannot find its root). The real build and boots are in
tests/e2e/test_distro_image.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from pathlib import Path

import pytest

from livemig.errors import BootstrapError
from livemig.guest import distro, distro_recipe
from livemig.guest.distro import Tool, build_disk_image, find_tools


def test_missing_tools_name_the_apt_get_line(tmp_path: Path) -> None:
    present = tmp_path / "present.bin"
    present.write_bytes(b"x")
    tools = (
        Tool("sh", "dash"),
        Tool("no-such-tool-livemig", "pkg-a"),
        Tool("data.bin", "pkg-b", str(tmp_path / "absent.bin")),
        Tool("also-missing-livemig", "pkg-a"),
        Tool("present.bin", "pkg-c", str(present)),
    )
    with pytest.raises(BootstrapError) as info:
        find_tools(tools)
    assert "apt-get install -y pkg-a pkg-b" in info.value.message
    assert info.value.details["missing"] == ["no-such-tool-livemig", "data.bin", "also-missing-livemig"]
    found = find_tools(tools[:1] + tools[4:])
    assert found["present.bin"] == present and found["sh"].name == "sh"


def test_recipe_hash_follows_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    base = distro_recipe.recipe_hash({"loader": "a"})
    assert base == distro_recipe.recipe_hash({"loader": "a"})  # stable
    assert base != distro_recipe.recipe_hash({"loader": "b"})  # a new loader binary
    monkeypatch.setattr(distro_recipe, "PACKAGES", (*distro_recipe.PACKAGES, "htop"))
    assert base != distro_recipe.recipe_hash({"loader": "a"})
    monkeypatch.undo()
    changed = (*distro_recipe.CONFIG_FILES[:-1], dataclasses.replace(distro_recipe.CONFIG_FILES[-1], mode=0o600))
    monkeypatch.setattr(distro_recipe, "CONFIG_FILES", changed)
    assert base != distro_recipe.recipe_hash({"loader": "a"})


def test_layout_fits_the_disk() -> None:
    d = distro_recipe.DISK
    mib = 1 << 20
    assert d.esp_start_mib * mib >= 34 * d.sector  # after the primary GPT
    assert d.esp_start_mib + d.esp_mib <= d.root_start_mib
    root_end = (d.root_start_mib + d.root_mib) * mib
    assert root_end + 33 * d.sector <= d.disk_bytes  # the backup GPT fits behind the root partition
    assert d.root_mib > 1024  # room for the system and some growth before growpart runs
    assert d.esp_mib >= 33  # FAT32 needs 65525 clusters


def test_boot_configuration_agrees_with_the_root_file_system() -> None:
    d = distro_recipe.DISK
    cmdline = distro_recipe.KERNEL_COMMAND_LINE
    assert f"root=UUID={d.root_fs_uuid}" in cmdline
    assert cmdline.split()[-1].startswith("console=ttyS0")  # the last console is /dev/console
    for name, content in distro_recipe.BOOT_LOADER_FILES.items():
        if name != "loader/loader.conf":
            assert cmdline in content, name
    fstab = next(f for f in distro_recipe.CONFIG_FILES if f.path == "/etc/fstab").content
    assert f"UUID={d.root_fs_uuid}\t/\text4" in fstab


def test_overlay_tar_holds_the_config_files_owned_by_root(tmp_path: Path) -> None:
    path = tmp_path / "overlay.tar"
    distro._overlay_tar(path)
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for config in distro_recipe.CONFIG_FILES:
            member = members[config.path.lstrip("/")]
            assert member.uid == 0 and member.gid == 0 and member.mode == config.mode
            extracted = tar.extractfile(member)
            assert extracted is not None and extracted.read().decode() == config.content
        for name, member in members.items():  # every parent directory comes before its files
            if member.isfile():
                assert os.path.dirname(name) in members


def test_copy_sparse_keeps_holes(tmp_path: Path) -> None:
    source, target = tmp_path / "src", tmp_path / "dst"
    with source.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(3 << 20)
        f.write(b"a" * 4096)
        f.seek(40 << 20)
        f.write(b"\0" * (2 << 20))  # allocated, but zeros: not copied
        f.seek(60 << 20)
        f.write(b"z" * 10)
    with target.open("wb") as f:
        f.truncate(128 << 20)
    written = distro._copy_sparse(source, target, 8 << 20)
    assert 4096 + 10 <= written <= 2 << 20  # the data, not the zeros or the holes
    data = target.read_bytes()
    assert data[(11 << 20) : (11 << 20) + 4096] == b"a" * 4096
    assert data[(68 << 20) : (68 << 20) + 10] == b"z" * 10
    assert data.count(0) == len(data) - 4096 - 10
    assert target.stat().st_blocks * 512 <= 4 << 20  # still sparse


def _fake_tools(tmp_path: Path) -> dict[str, Path]:
    tools = {}
    for name in ("gptmbr.bin", "ldlinux.c32", "systemd-bootx64.efi"):
        tools[name] = tmp_path / name
        tools[name].write_bytes(name.encode())
    return tools


def test_a_built_image_is_returned_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tools = _fake_tools(tmp_path)
    monkeypatch.setattr(distro, "find_tools", lambda: tools)
    recipe_id = distro._recipe_id(tools)
    image_dir = tmp_path / "cache" / "distro" / recipe_id
    image_dir.mkdir(parents=True)
    (image_dir / "disk.qcow2").write_bytes(b"q" * 1000)
    stamp = {
        "recipe": recipe_id, "file_size": 1000, "virtual_size": 2 << 30, "allocated": 500, "kernel_version": "6.1",
        "kernel_cmdline": "console=ttyS0", "default_user": "debian", "build_seconds": 90.0,
    }  # fmt: skip
    (image_dir / "image.json").write_text(json.dumps(stamp))

    def must_not_build(*_args: object) -> distro.DiskImage:
        raise AssertionError("built although the cache holds the image")

    monkeypatch.setattr(distro, "_build", must_not_build)
    image = build_disk_image(tmp_path / "cache")
    assert image.path == image_dir / "disk.qcow2" and image.recipe == recipe_id and image.build_seconds == 90.0

    # A recipe change (here: another loader binary) means a new build, not the stale image.
    tools["ldlinux.c32"].write_bytes(b"another syslinux")
    with pytest.raises(AssertionError, match="built although"):
        build_disk_image(tmp_path / "cache")
    # A damaged file (size differs from the stamp) is not returned either.
    tools["ldlinux.c32"].write_bytes(b"ldlinux.c32")
    (image_dir / "disk.qcow2").write_bytes(b"q" * 10)
    with pytest.raises(AssertionError, match="built although"):
        build_disk_image(tmp_path / "cache")


def test_white_space_in_the_cache_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distro, "find_tools", lambda: _fake_tools(tmp_path))
    with pytest.raises(BootstrapError, match="white space"):
        build_disk_image(tmp_path / "my cache")


def test_a_long_step_reports_its_status_lines_and_is_killed_at_its_deadline() -> None:
    seen: list[str] = []
    distro._run_streaming(["sh", "-c", "echo 'I: one'; echo noise; echo 'I: two'"], "step", seen.append, timeout=30)
    assert seen == ["one", "two"]
    with pytest.raises(BootstrapError, match=r"step failed \(exit status 3\): E: broken"):
        distro._run_streaming(["sh", "-c", "echo 'E: broken'; exit 3"], "step", seen.append, timeout=30)
    with pytest.raises(BootstrapError, match="not done within 1s"):  # silent and stuck: killed anyway
        distro._run_streaming(["sleep", "30"], "step", seen.append, timeout=1)


def test_mount_points_below_a_path_are_found() -> None:
    assert "/proc" in distro._mount_points_below(Path("/"))  # as the chroot check sees a mounted /proc
    assert distro._mount_points_below(Path("/proc/self/fd")) == []
