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
    out = r.stdout
    # Each filter visibly acts in the tour.
    assert "HTTP 401" in out and "Jwt is missing" in out                     # auth: no token
    assert "model_not_allowed" in out                                        # auth: model access
    assert "HTTP 200  x-mock-provider: local" in out                         # failover after a 429
    assert "Rejected due to inappropriate content" in out                    # prompt-guard: reject
    assert "Try XXXXXXXXXXXXXXXXXXX in the sandbox." in out                  # prompt-guard: mask
    assert "HTTP 429  x-envoy-ratelimited: true" in out                      # token-ratelimit
    assert "You are the ACME assistant. You answer for alice of team dev." in out  # enrichment
    assert "gen_ai_client_token_usage{" in out                               # usage-metrics
    assert '"user": "alice"' in out                                          # access log hand-off
