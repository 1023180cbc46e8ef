#!/bin/sh
# Install everything aurae-py needs on a fresh Debian machine, idempotently:
# the Debian packages the daemon, tests and benchmarks drive, then a virtual
# environment in .venv with the project and its dev tools.
set -eu
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# iproute2: `ip` inside network namespaces; util-linux: unshare/nsenter;
# catatonit: pid 1 of isolated cells; runc + busybox-static: the peer the cell
# benchmarks compare against; busybox-static is also the guest initramfs's
# shell; qemu-system-x86: the VMM of virtual machines; e2fsprogs: ext4 drive
# images for them; mmdebstrap: the optional guest root image (`auraed vm-image
# --root-image`) from Debian packages (the guest kernel itself is fetched by `auraed vm-image`
# with apt-get download, and cached).
DEBIAN_PACKAGES="iproute2 util-linux catatonit runc busybox-static qemu-system-x86 e2fsprogs mmdebstrap"

missing=""
for package in $DEBIAN_PACKAGES; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
        missing="$missing $package"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install.sh: need root to apt-get install:$missing" >&2
        exit 1
    fi
    echo "install.sh: installing Debian packages:$missing"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# Reinstall the Python side only when the project definition changed.
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    # compat: a plain .pth path entry; the default editable finder costs ~14 ms
    # at every interpreter start, which the CLI cold start cannot afford.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        --config-settings editable_mode=compat -e ".[dev,bench]"
    touch "$stamp"
fi
# pip byte-compiles what it installs from wheels, but not an editable checkout;
# without this every aurae-py start compiles its modules again (when Python
# is told not to write bytecode, as some environments do).
.venv/bin/python -m compileall -q -j 0 aurae_sdk aurae_cli auraed codegen bench >/dev/null
