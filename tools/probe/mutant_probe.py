"""pytest plugin of ``tools/mutants.py`` (loaded with ``-p mutant_probe``; not a test helper).

It appends one JSON line per failing report to the file ``$NORMKD_MUTANT_PROBE`` names: the exact
node id and the phase (``collect``, ``setup``, ``call``, ``teardown``). The runner needs both: only
a test that fails in its ``call`` phase kills a mutant, and that node id is re-run verbatim to
confirm the kill. Parsing pytest's summary lines instead would cut ids that hold spaces.
"""

from __future__ import annotations

import json
import os

import pytest

_IN_WORKER = False  # a pytest-xdist worker: its reports reach the controller's hooks too


def pytest_configure(config: pytest.Config) -> None:
    global _IN_WORKER
    _IN_WORKER = hasattr(config, "workerinput")


def _record(nodeid: str, when: str) -> None:
    path = os.environ.get("NORMKD_MUTANT_PROBE")
    if path and not _IN_WORKER:  # recorded once, by the controller
        with open(path, "a") as fh:
            fh.write(json.dumps({"nodeid": nodeid, "when": when}) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _record(report.nodeid, report.when)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _record(report.nodeid, "collect")
