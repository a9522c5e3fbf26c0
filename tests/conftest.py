"""Shared fixtures (helpers live in helpers.py so test modules can import them by name)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import CI_MANIFEST, FAST_MANIFEST, build_session_cache  # noqa: E402


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory) -> Path:
    """A cache holding every variant of tests/fast.yaml (built once per session): one kernel of
    every family on every arch, and what the fast tier's runtime tests load."""
    return build_session_cache(tmp_path_factory, "fast-cache", FAST_MANIFEST)


@pytest.fixture(scope="session")
def ci_cache(tmp_path_factory, built_cache) -> Path:
    """A cache holding every variant of manifests/ci.yaml (full tier; tests/fast.yaml's entries are
    reused, not compiled again)."""
    return build_session_cache(tmp_path_factory, "ci-cache", CI_MANIFEST, reuse=(built_cache,))
