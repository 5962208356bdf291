import pytest
import torch

# One intra-op thread. The tests' networks are small, so a second thread gains little, and whenever
# anything else runs on CI's two cores (the tests' own subprocesses, another job) two spinning
# OpenMP threads per training step made the fitting tests 20-50x slower (1 s -> 30-60 s each).
torch.set_num_threads(1)


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
