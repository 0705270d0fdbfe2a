"""Benchmark collection and reporting.

pytest only collects ``test_*.py`` by default and pyproject's pytest section points at tests/,
so ``pytest benchmarks --benchmark-only`` relies on ``pytest_collect_file`` below to find the
``bench_*.py`` files. Benchmarks may append lines to the ``bench_summary`` fixture; they are
printed after pytest-benchmark's tables (output written during teardown would be captured).
"""
from __future__ import annotations

from typing import List

import pytest

_SUMMARY = pytest.StashKey[List[str]]()


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if parent.session.isinitpath(file_path):
            return None  # named on the command line: pytest's own collector takes it
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_summary(request) -> List[str]:
    return request.config.stash.setdefault(_SUMMARY, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("benchmark summary")
        for line in lines:
            terminalreporter.write_line(line)
