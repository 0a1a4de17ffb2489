"""The one exception type the CLI turns into a one-line message."""


class VmctlError(Exception):
    """A user-facing failure: its message is printed as one line, without a traceback."""


class GuestMemoryError(VmctlError):
    """A guest-physical access outside guest RAM."""
