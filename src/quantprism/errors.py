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
