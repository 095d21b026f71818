"""Fixtures shared by every test folder; the helpers themselves are in helpers.py."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from helpers import FAMILIES


@pytest.fixture(params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def clone() -> Callable[[Any], Any]:
    return copy.deepcopy
