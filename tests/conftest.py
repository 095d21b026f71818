"""Fixtures shared by every test folder; the helpers themselves are in helpers.py."""

from __future__ import annotations

import copy

import pytest
from helpers import FAMILIES


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def clone():
    return copy.deepcopy
