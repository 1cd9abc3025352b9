"""conftest.require_module: a missing test dependency skips on a laptop and fails in CI."""
import pytest
from conftest import require_module

MISSING = "a_module_that_is_not_installed_anywhere"


def _outcome(monkeypatch, ci_value, name=MISSING):
    """What require_module raises (a pytest outcome is a BaseException) with CI set as given."""
    if ci_value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci_value)
    try:
        return require_module(name)
    except BaseException as e:  # noqa: BLE001 - skip/fail outcomes are what is tested
        return e


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_missing_dependency_fails_in_ci(monkeypatch, value):
    got = _outcome(monkeypatch, value)
    assert isinstance(got, pytest.fail.Exception), got
    assert f"CI is set and the test dependency '{MISSING}' does not import" in str(got)
    assert "pip install -e '.[test]'" in str(got)


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_missing_dependency_skips_outside_ci(monkeypatch, value):
    assert isinstance(_outcome(monkeypatch, value), pytest.skip.Exception)


@pytest.mark.parametrize("value", [None, "true"])
def test_present_dependency_is_returned(monkeypatch, value):
    import json

    assert _outcome(monkeypatch, value, "json") is json
