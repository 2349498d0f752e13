"""Shared fixtures for the data tests: one tiny synthetic world (32 px) per test session."""

import pytest

from mflightning.data import WorldSizes, generate_world

TINY = WorldSizes(calibration=8, train=6, val=3, test=3, vqa_train=6, vg=3, vqa_test=3, questions_per_image=2)


@pytest.fixture(scope="session")
def tiny_sizes():
    """Image counts of the tiny world."""
    return TINY


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny generated world; tests must not modify it."""
    return generate_world(tmp_path_factory.mktemp("world"), seed=0, sizes=TINY, image_size=32)
