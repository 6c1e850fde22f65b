"""Command line, failures: the one-line error an operator sees and the exit status it ends the
command with."""

from __future__ import annotations

EX_USAGE, EX_CONFIG = 2, 78  # sysexits.h; systemd can use RestartPreventExitStatus=78


class Fail(Exception):
    """A one-line error for the operator, with the exit status to use."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status
