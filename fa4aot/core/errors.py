"""Exceptions raised by fa4aot.

Every error says what was wrong and where (a manifest field, an argument name, a cache key), so a
user can fix it without reading the source. All derive from :class:`Fa4aotError`.
"""

from __future__ import annotations


class Fa4aotError(Exception):
    """Base class of every fa4aot error."""


class ManifestError(Fa4aotError, ValueError):
    """An invalid manifest; the message starts with the offending field path."""

    #: Longest reason kept (a hostile value's repr can be megabytes).
    MAX_REASON = 400

    def __init__(self, field: str, reason: str):
        self.field = field[: self.MAX_REASON]
        self.reason = reason if len(reason) <= self.MAX_REASON else reason[: self.MAX_REASON] + "..."
        super().__init__(f"{self.field}: {self.reason}")


class CacheError(Fa4aotError):
    """The cache is unreadable, or an entry's metadata is malformed."""


class CacheFullError(CacheError):
    """The disk (or the index database) holding the cache is full."""


class CorruptArtifactError(CacheError):
    """A blob's bytes do not match the sha256 recorded for them (flipped, truncated, missing)."""


class VariantNotFoundError(Fa4aotError, LookupError):
    """The cache has no artifact for the variant a call needs (``variant``, when known)."""

    def __init__(self, message: str, variant: object = None):
        super().__init__(message)
        self.variant = variant


class DeviceMismatchError(Fa4aotError):
    """The cache was built for another GPU (arch, SM count), driver or host CPU."""


class ArgumentError(Fa4aotError, ValueError):
    """A launch argument has the wrong dtype, shape, stride, alignment or device."""


class FA4RejectsError(ArgumentError, AssertionError):
    """FA4's interface rejects this call with an assertion (its head-dim check, interface.py
    134-151): an AssertionError too, as FA4's is, so callers that catch FA4's error catch it."""


class PlanError(Fa4aotError):
    """A launch plan could not be loaded or called, or recorded something unexpected."""


class LaunchError(Fa4aotError):
    """The CUDA driver rejected a launch (``code`` is the CUresult)."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


class ToolchainError(Fa4aotError):
    """A build tool (CUTLASS DSL, C compiler) is missing or failed."""
