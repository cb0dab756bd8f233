"""Shared pytest configuration: hypothesis profiles and test isolation.

Profiles (select with HYPOTHESIS_PROFILE=...):
  ci    -- derandomized, few examples, no deadline (default under CI=true)
  dev   -- the default locally: random, a few more examples
  debug -- many examples, verbose output
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, Verbosity, settings

settings.register_profile(
    "ci",
    max_examples=8,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("debug", max_examples=200, deadline=None, verbosity=Verbosity.verbose)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with an empty dynamo cache and no leftover compile state."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
