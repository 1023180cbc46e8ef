"""What every test that boots a real guest is marked with: such tests are slow (TCG here) and
need root and QEMU, which scripts/install.sh installs."""

import os
import shutil

import pytest

GUEST_MARKS = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86 is not installed (scripts/install.sh)"),
]
