"""One error family; `cli.report` catches it once and prints one line.

Exit codes of hpcrun itself (the contained command's own status passes through
unchanged, so these are chosen high to rarely collide with it):
"""

USAGE = 2  # bad command line: unknown flag, malformed --bind, relative destination
CONFIG = 251  # malformed or unreadable configuration file
IMAGE = 252  # image missing, not an image, truncated, corrupt, nothing runnable in it
BIND = 253  # bind source missing, destination escapes the image
RUNTIME = 254  # the kernel or a tool refused: user namespace, FUSE, mount, newuidmap; disk full
INTERNAL = 255  # a bug in hpcrun (run with --debug for the traceback)
NOT_EXECUTABLE = 126  # command found in the image but cannot be executed
NOT_FOUND = 127  # command not found in the image

# The name the command was invoked as (hpcrun, apptainer, singularity): set by cli.main,
# used in every message line.
PROG = "hpcrun"


class HpcrunError(Exception):
    code = INTERNAL

    def __init__(self, message, hint=None, code=None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def line(self):
        return f"{PROG}: error: {self.message}" + (f" ({self.hint})" if self.hint else "")


class UsageError(HpcrunError):
    code = USAGE


class ConfigError(HpcrunError):
    code = CONFIG


class ImageError(HpcrunError):
    code = IMAGE


class BindError(HpcrunError):
    code = BIND


class RuntimeSetupError(HpcrunError):
    code = RUNTIME


class DiskFullError(RuntimeSetupError):
    """ENOSPC/EDQUOT: said as disk full, with the place, never as a corrupt image."""
