import os

import pytest
import torch

# Two cores in CI: keep torch from oversubscribing them when pytest runs alongside other work.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Slow tests in files whose authors keep them in step with other files (test_readme.py with README.md):
# marked here rather than with a decorator there. Everything else carries @pytest.mark.slow itself.
SLOW_ELSEWHERE = {
    "test_readme.py::test_readme_first_command_runs_the_whole_job",  # the README's whole demo job
    "test_readme.py::test_readme_python_example_runs_and_prunes",  # fits a network
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{item.path.name}::{item.originalname}" in SLOW_ELSEWHERE:
            item.add_marker(pytest.mark.slow)
