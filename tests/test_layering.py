"""The dependency rule of DESIGN.md: streams <- jobs <- serving <- cluster."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

CHECKER = ROOT.parent / "shared" / "tools" / "check-layering"


@pytest.mark.skipif(not CHECKER.exists(), reason="../shared/tools/check-layering is not beside this checkout")
def test_no_import_breaks_the_layering() -> None:
    result = subprocess.run([sys.executable, str(CHECKER)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
