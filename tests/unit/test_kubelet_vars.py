"""harness.kubelet_vars follows the kubelet's `$(NAME)` rules (the builders' tests rely on it)."""

from __future__ import annotations

import pytest

from harness.kubelet_vars import expand_vars


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)/x", "1/x"),
        ("$$(A)", "$(A)"),
        ("$(MISSING)", "$(MISSING)"),
        ("cost $5 $", "cost $5 $"),
        ("$(A", "$(A"),
        ("$(A)$(B)", "12"),
    ],
)
def test_expand_vars_follows_kubelet_rules(text: str, expected: str) -> None:
    assert expand_vars(text, {"A": "1", "B": "2"}) == expected
