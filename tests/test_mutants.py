"""The mutation check's list stays true to the code: every mutant's text is still there, once.

When code moves, a stale mutant would silently stop testing anything; this test makes the move
update tools/mutant_list.py in the same change.
"""

import subprocess
import sys

from support import ROOT


def test_every_mutant_applies_exactly_once_and_compiles() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "mutants.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mutants apply" in proc.stdout
