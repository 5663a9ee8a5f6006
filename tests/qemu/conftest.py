"""Fixtures for tests that boot the QEMU stand-in router.

The image is built (or taken from the cache in qemu/build/) once per
session. A host without qemu-system-x86_64 skips these tests, except under
CI=true, where it fails them: CI must install what the suite needs.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QEMU_DIR = os.path.join(ROOT, "qemu")
if QEMU_DIR not in sys.path:
    sys.path.insert(0, QEMU_DIR)


def pytest_configure(config):
    config.addinivalue_line("markers", "qemu: boots the QEMU stand-in router (slow: seconds per boot)")


@pytest.fixture(scope="session")
def qemu_image():
    """The stand-in image's ImagePaths, built from Debian packages on first use and cached."""
    # Imported here: routers uses the `qemu` marker, which pytest_configure registers.
    from routers import require_qemu
    from spotfi_qemu import build_image

    require_qemu()
    return build_image()
