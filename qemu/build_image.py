#!/usr/bin/env python3
"""Build the QEMU stand-in router image under qemu/build/image (what `make qemu-image` runs).

The build is skipped when an image of the same inputs is already there;
--force builds it again. Needs apt-get, dpkg-deb and mke2fs, and pip for the
ptyprocess wheel.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from spotfi_qemu.image import DEFAULT_BUILD_DIR, BuildError, build_image  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default=DEFAULT_BUILD_DIR,
                        help="directory for the package cache and the image (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="build even when the cached image matches the inputs")
    options = parser.parse_args()
    try:
        image = build_image(options.build_dir, force=options.force)
    except BuildError as error:
        sys.stderr.write("qemu-image: %s\n" % error)
        return 1
    manifest = image.read_manifest()
    print("image: %s" % image.directory)
    print("kernel %s (%.1f MB), initramfs %.1f MB gzipped, %.1f MB unpacked"
          % (manifest["kernel"], manifest["kernel_bytes"] / 1e6, manifest["initramfs_bytes"] / 1e6,
             manifest["rom_bytes"] / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
