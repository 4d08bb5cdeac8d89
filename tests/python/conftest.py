"""Shared pytest plumbing: makes the helper module importable whatever the
import mode, and prints the worst relative error seen per category at the end
of the run (the ``max relative errors`` section; see qmoe_np.record)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qmoe_np  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    worst = qmoe_np.WORST_ERRORS
    if not worst:
        return
    terminalreporter.section("max relative errors (max|got - want| / max|want|)")
    for cat in sorted(worst):
        terminalreporter.write_line(f"{cat:60s} {worst[cat]:.3e}")
