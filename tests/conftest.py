"""Shared fixtures: the real SmolLM2 model (its tests are marked `slow`), the Eiffel Tower fact, and Chromium for
the HTML report tests (skipped locally without it, a failure in CI)."""

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)

pytest_plugins = ["pytester"]  # tests/test_conftest.py runs pytest on the harness itself

SLOW_FIXTURES = {"smollm2"}  # a test that uses one of these (directly or through another fixture) is `slow`


def pytest_collection_modifyitems(config, items):
    """Mark every test that loads the real model `slow`, so `pytest -m "not slow"` is the fast inner loop."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def in_ci() -> bool:
    """True when the environment says this is a CI run (`CI=true`, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_chromium() -> str:
    """The headless Chromium executable; skips the test when it is missing locally, fails it in CI (where
    .ci/system-deps installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    message = "Chromium is required for the report test (.ci/system-deps installs Debian's chromium)"
    if in_ci():
        pytest.fail(f"{message}; CI=true and no chromium or chromium-browser on PATH", pytrace=False)
    pytest.skip(f"{message}: not on PATH")


@pytest.fixture
def chromium() -> str:
    """The Chromium executable (see `require_chromium`)."""
    return require_chromium()


@pytest.fixture(scope="session")
def smollm2():
    import locedit

    return locedit.load("smollm2-135m")


@pytest.fixture(scope="session")
def eiffel():
    import locedit

    return locedit.Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of", " Paris")
