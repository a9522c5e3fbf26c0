"""Shared fixtures (helpers live in helpers.py so test modules can import them by name)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import CI_MANIFEST, FAST_MANIFEST, HAS_DSL, BackgroundBuild, build_session_cache  # noqa: E402

#: The fast cache's build, started once collection shows a test needs it.
_FAST_BUILD: list[BackgroundBuild] = []


@pytest.hookimpl(trylast=True)  # after the tmp_path plugin's own
def pytest_configure(config):
    """A run of the whole suite (no paths given: pytest's testpaths) needs the fast cache in
    every tier: its build starts now, so it also overlaps collection (~15 s of imports on the
    2-core CI box); collection stops it if no selected test needs it after all."""
    whole = getattr(config, "args_source", None) == pytest.Config.ArgsSource.TESTPATHS
    if HAS_DSL and whole and not config.option.collectonly:
        _start_build(config)


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected what this run skips
def pytest_collection_modifyitems(session, config, items):
    """Start building tests/fast.yaml in the background (unless pytest_configure did) and run
    the tests that need no cache first (in their order), so the build overlaps them instead of
    delaying the whole run."""
    needs = [item for item in items if "built_cache" in getattr(item, "fixturenames", ())]
    if not needs:
        _stop_builds()  # (an early build no selected test needs)
        return
    if not HAS_DSL:
        return
    _start_build(config)
    first = [item for item in items if "built_cache" not in getattr(item, "fixturenames", ())]
    items[:] = first + needs


def _start_build(config) -> None:
    """The fast cache's background build, once per session."""
    if not _FAST_BUILD:
        _FAST_BUILD.append(BackgroundBuild(config._tmp_path_factory, "fast-cache", FAST_MANIFEST))


def pytest_sessionfinish(session, exitstatus):
    """A build no test waited for (the run stopped early) does not outlive the session."""
    _stop_builds()


def _stop_builds() -> None:
    """Stop a background build still running, and forget it."""
    for build in _FAST_BUILD:
        build.stop()
    _FAST_BUILD.clear()


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory) -> Path:
    """A cache holding every variant of tests/fast.yaml (built once per session): one kernel of
    every family on every arch, and what the fast tier's runtime tests load."""
    if _FAST_BUILD:
        return _FAST_BUILD[0].wait()
    return build_session_cache(tmp_path_factory, "fast-cache", FAST_MANIFEST)


@pytest.fixture(scope="session")
def ci_cache(tmp_path_factory, built_cache) -> Path:
    """A cache holding every variant of manifests/ci.yaml (full tier; tests/fast.yaml's entries are
    reused, not compiled again)."""
    return build_session_cache(tmp_path_factory, "ci-cache", CI_MANIFEST, reuse=(built_cache,))


def _fake_runtime(cache: Path, cc: tuple[int, int], num_sms: int):
    from fake_driver import FakeDriver

    from fa4aot.runtime.loader import Runtime

    drv = FakeDriver(cc=cc, num_sms=num_sms)
    return Runtime(cache, driver=drv), drv


@pytest.fixture
def sm90(built_cache):
    """(a Runtime on the fast cache, its fake driver) for an H100: sm_90a, 132 SMs."""
    return _fake_runtime(built_cache, (9, 0), 132)


@pytest.fixture
def sm100(built_cache):
    """(a Runtime on the fast cache, its fake driver) for a B200: sm_100a, 148 SMs."""
    return _fake_runtime(built_cache, (10, 0), 148)
