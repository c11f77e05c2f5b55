"""Typed user-facing errors. The CLI prints ``str(err)`` as one line on stderr and exits 2."""
from __future__ import annotations


class QuantprismError(Exception):
    """An error the user can fix; the message says what to do."""

    exit_code = 2


class ConfigError(QuantprismError):
    """targets.toml (or a setting) is invalid."""


class ModelError(QuantprismError):
    """A model directory cannot be used."""


class CalibrationError(QuantprismError):
    """A calibration source cannot be used."""


class ArtifactError(QuantprismError):
    """An artifact on disk is malformed, truncated or incomplete."""


class RuntimeUnavailable(QuantprismError):
    """A runtime cannot run on this machine (the message says why)."""


class DiskFullError(QuantprismError):
    """A write failed for lack of space (ENOSPC, EDQUOT) or over the file-size limit (EFBIG)."""


DISK_FULL_ERRNOS = (28, 27, 122)  # ENOSPC, EFBIG, EDQUOT (Linux)


def disk_full(e: BaseException, what: str) -> DiskFullError | None:
    """The one-line error for a write that ran out of room, or None if ``e`` is something else."""
    import re

    # numpy's tofile reports a short fwrite as "N requested and M written" without an errno: the same full disk
    short = isinstance(e, OSError) and e.errno is None and re.fullmatch(r"\d+ requested and \d+ written", str(e))
    if isinstance(e, OSError) and (e.errno in DISK_FULL_ERRNOS or short):
        return DiskFullError(f"{what}: {e.strerror or 'short write'}{f' ({e.filename})' if e.filename else ''}; free space "
                             "(or raise the file-size limit) and run the same command again — finished files are kept")
    return None
