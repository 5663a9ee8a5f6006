"""QEMU stand-in router for spotfi-agent's end-to-end tests: image builder and guest controller."""

from spotfi_qemu.errors import (GuestBootError, GuestError, GuestStateError, GuestTimeoutError,
                                QmpError)
from spotfi_qemu.guest import GUEST_ADDRESS, CommandResult, Guest, kvm_usable
from spotfi_qemu.image import BuildError, ImagePaths, build_image
from spotfi_qemu.machine import GUEST_BROKER_HOST, GUEST_BROKER_PORT

__all__ = [
    "BuildError", "CommandResult", "GUEST_ADDRESS", "GUEST_BROKER_HOST", "GUEST_BROKER_PORT",
    "Guest", "GuestBootError", "GuestError", "GuestStateError", "GuestTimeoutError",
    "ImagePaths", "QmpError", "build_image", "kvm_usable",
]
