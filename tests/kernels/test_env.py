"""The kernels' whole-number settings from the environment: defaults, values, clear refusals."""

from __future__ import annotations

import pytest

from tandem.errors import KernelError
from tandem.kernels.env import env_int


def test_unset_or_empty_gives_the_default_and_numbers_pass(monkeypatch):
    monkeypatch.delenv("TANDEM_TEST_KNOB", raising=False)
    assert env_int("TANDEM_TEST_KNOB", default=7) == 7
    monkeypatch.setenv("TANDEM_TEST_KNOB", " ")
    assert env_int("TANDEM_TEST_KNOB", default=7) == 7
    monkeypatch.setenv("TANDEM_TEST_KNOB", "12")
    assert env_int("TANDEM_TEST_KNOB", minimum=12) == 12


@pytest.mark.parametrize("value", ["many", "1.5", "-1", "3"])
def test_bad_values_are_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("TANDEM_TEST_KNOB", value)
    with pytest.raises(KernelError, match=rf"TANDEM_TEST_KNOB must be a whole number >= 4, got '{value}'"):
        env_int("TANDEM_TEST_KNOB", minimum=4)
