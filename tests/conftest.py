"""Shared pytest configuration of the test suite."""

import torch
from hypothesis import HealthCheck, settings

# The tests use tiny tensors: intra-op threads buy nothing there, and on a
# loaded 2-core machine waiting for them made the suite several times slower.
torch.set_num_threads(1)

# Sweeps build layers and torch.func references: a per-example deadline would
# only make timings on a loaded machine flaky. Each test sets its example count.
settings.register_profile(
    "tnbackpack",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("tnbackpack")


def pytest_configure(config):
    # PyTorch warns that 'same' padding with an even kernel copies the input;
    # the tests use such layers on purpose.
    config.addinivalue_line("filterwarnings", "ignore:Using padding='same':UserWarning")
