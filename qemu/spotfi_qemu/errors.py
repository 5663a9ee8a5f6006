"""Exceptions of the QEMU stand-in controller."""


class GuestError(Exception):
    """Base of every error the controller raises."""


class GuestBootError(GuestError):
    """Raised when QEMU exits or the guest's control agent does not reply in time while booting."""


class GuestTimeoutError(GuestError):
    """Raised when a guest command runs past its timeout or the control agent stops replying."""


class GuestStateError(GuestError):
    """Raised when a method is called in a lifecycle state that does not allow it."""


class QmpError(GuestError):
    """Raised when QEMU's QMP socket rejects a command or cannot be reached."""
