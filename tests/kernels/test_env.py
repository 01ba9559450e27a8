"""The kernels' settings from the environment: whole numbers (defaults, values, clear refusals)
and the Triton modules some of them need."""

from __future__ import annotations

import pytest

from tandem.errors import KernelError
from tandem.kernels.env import env_int, triton_module


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


@pytest.mark.parametrize("asked", [True, False])
def test_a_missing_triton_module_warns_only_when_asked_for(monkeypatch, caplog, asked):
    import sys

    import tandem.kernels
    # as if triton were missing: the import fails (even where an earlier test imported it)
    monkeypatch.setitem(sys.modules, "tandem.kernels.triton_matvec", None)
    monkeypatch.delattr(tandem.kernels, "triton_matvec", raising=False)
    with caplog.at_level("WARNING"):
        assert triton_module("triton_matvec", "TANDEM_QUANT_TRITON", "the compiled matvec", asked) is None
    assert ("TANDEM_QUANT_TRITON=1 but Triton is missing" in caplog.text) == asked
