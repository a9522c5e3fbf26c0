"""Shared fixtures (helpers live in helpers.py so test modules can import them by name)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import build_ci_cache  # noqa: E402


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory) -> Path:
    """A cache holding every variant of manifests/ci.yaml (built once per session)."""
    return build_ci_cache(tmp_path_factory)
