"""Session fixtures shared by all tests: one model cache and the two built-in tiny models.

The tiny pipelines are built once per session (a few seconds) into a temporary cache, so
tests never touch the user's cache or the network.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    # diffusers' Euler scheduler calls np.array() on a torch tensor; numpy 2 warns on every call.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A session-wide model cache; MBP_SEARCH_CACHE points at it (also for subprocesses)."""
    path = tmp_path_factory.mktemp("mbp-cache")
    old = os.environ.get("MBP_SEARCH_CACHE")
    os.environ["MBP_SEARCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MBP_SEARCH_CACHE", None)
    else:
        os.environ["MBP_SEARCH_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_sdxl_spec(model_cache):
    from workers.models import resolve_model

    return resolve_model("tiny-sdxl", model_cache)


@pytest.fixture(scope="session")
def tiny_sd_spec(model_cache):
    from workers.models import resolve_model

    return resolve_model("tiny-sd", model_cache)


def _available(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        return mps is not None and mps.is_available()
    return True


@pytest.fixture(params=["cpu", "cuda", "mps"])
def device(request) -> str:
    """Each torch device present on this machine (others are skipped)."""
    if not _available(request.param):
        pytest.skip(f"{request.param} not available")
    return request.param
