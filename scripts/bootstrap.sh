#!/usr/bin/env bash
# Idempotent bootstrap used by `make demo` and `make test`: Debian packages, the .venv with
# livemig installed editable (dev extras), and the guest image in the cache. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio libnbd-bin gcc libc6-dev iproute2 openssl curl chromium chromium-driver fonts-dejavu-core mmdebstrap e2fsprogs dosfstools mtools gdisk syslinux syslinux-common systemd-boot-efi ovmf seabios openssh-client)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "livemig needs these Debian packages: ${missing[*]}" >&2
    echo "install them as root:  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.livemig-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing livemig and its dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

.venv/bin/livemig image build
