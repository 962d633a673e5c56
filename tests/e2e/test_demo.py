"""The README's demo command works end to end (tour only, free ports)."""
import re
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
    # semantic-cache: a miss, then the same prompt from the cache (exact tier) without a
    # provider call and faster, then a paraphrase from the semantic tier.
    miss = re.search(r"▶ semantic-cache: a new prompt is a miss.*?x-sluice-cache: miss.*?: (\d+) ms;", out, re.S)
    assert miss, out
    hit = re.search(r"▶ semantic-cache: the same prompt again.*?HTTP 200  x-sluice-cache: hit-exact\n.*?"
                    r"answered from the cache in (\d+) ms: time saved (\d+) ms; provider calls since: 0", out, re.S)
    assert hit, out
    miss_ms, hit_ms, saved_ms = int(miss.group(1)), int(hit.group(1)), int(hit.group(2))
    assert miss_ms >= 400 > hit_ms and saved_ms >= 300, (miss_ms, hit_ms, saved_ms)   # the provider took 400 ms
    assert re.search(r"▶ semantic-cache: a paraphrase.*?HTTP 200  x-sluice-cache: hit-semantic; distance=0\.\d+", out, re.S), out
    # rag: the french-cheeses passage reached the provider in a system message.
    rag = re.search(r"▶ rag: .*?the provider received a system message with the retrieved passage: (.*?)\n", out, re.S)
    assert rag and "[french-cheeses.md]" in rag.group(1) and "between 1,000 and 1,600 varieties" in rag.group(1), out
