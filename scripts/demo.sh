#!/usr/bin/env bash
# The README's demo command: from a fresh clone, install what is needed, build the filters,
# start mock providers, Chroma (semantic cache and RAG store, 127.0.0.1, loaded with
# examples/rag/corpus) and Envoy with the sluice filters (envoy/envoy.yaml), run a short
# scripted tour of requests, then keep the gateway up until Ctrl-C.
#   scripts/demo.sh               tour, then keep running (gateway on 127.0.0.1:10000)
#   scripts/demo.sh --tour-only   exit after the tour
#   scripts/demo.sh --port 0      pick free ports (also for admin and providers)
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
scripts/setup.sh
scripts/build.sh >/dev/null
exec "$VENV/bin/python" scripts/demo.py "$@"
