"""The test harness itself: real-model tests are marked `slow`, and the Chromium requirement skips locally but
fails in CI."""

import shutil

import pytest

import conftest


def test_require_chromium_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Chromium is required"):
        conftest.require_chromium()
    for value in ("true", "1", "TRUE"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match="CI=true"):
            conftest.require_chromium()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        conftest.require_chromium()


def test_require_chromium_finds_either_name(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(shutil, "which", lambda name: "/opt/cb" if name == "chromium-browser" else None)
    assert conftest.require_chromium() == "/opt/cb"


def test_real_model_tests_are_marked_slow(pytester):
    pytester.makeconftest(open(conftest.__file__).read())
    pytester.makepyfile("""
        import pytest

        @pytest.fixture
        def uses_model(smollm2):
            return smollm2

        def test_direct(smollm2): pass
        def test_indirect(uses_model): pass
        def test_fast(eiffel): pass
    """)
    result = pytester.runpytest("-m", "not slow", "--collect-only", "-q")
    out = result.stdout.str()
    assert "test_fast" in out and "test_direct" not in out and "test_indirect" not in out
    result = pytester.runpytest("-m", "slow", "--collect-only", "-q")
    out = result.stdout.str()
    assert "test_direct" in out and "test_indirect" in out and "test_fast" not in out
