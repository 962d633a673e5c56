"""The README's demo command works end to end (tour only, free ports)."""
import subprocess
import sys

from harness import ROOT, VENV_BIN


def test_demo_tour_runs():
    r = subprocess.run([str(VENV_BIN / "python"), "scripts/demo.py", "--tour-only", "--port", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    sys.stdout.write(r.stdout[-4000:])
    assert r.returncode == 0, r.stderr[-4000:]
    assert "sluice gateway listening on" in r.stdout
    assert "HTTP 200" in r.stdout
