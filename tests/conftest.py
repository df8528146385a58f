import os

# Nothing in the test suite may reach a model hub: presets are built from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# A CUDA estimate reads this machine's calibrated device profile if there is one: tests use memfit's defaults.
os.environ["MEMFIT_DEVICE_PROFILE"] = os.path.join(os.path.dirname(__file__), "no-such-dir", "device.json")

import pytest
import torch
from hypothesis import settings

# Property tests draw the same cases on every run (CI must not flake); HYPOTHESIS_PROFILE=explore
# draws new ones, many more, to look for a counterexample by hand.
settings.register_profile("default", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: intra-op threads on top only oversubscribe the cores.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
