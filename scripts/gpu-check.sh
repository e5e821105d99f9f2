#!/usr/bin/env bash
# Validate a lent GPU in one command: the entry point README and issues name. The check lives in benchmarks/gpu/
# (check.sh, and check.py beside it, which says what each check measures); this runs it with the same arguments.
#
#   bash scripts/gpu-check.sh --fetch-wheels   # once, where pip reaches PyPI: scripts/gpu-wheels.txt into .whl/
#   bash scripts/gpu-check.sh                  # on the GPU machine; gpu-check.json and .md into $OUT or gpu-check-out/
#   bash scripts/gpu-check.sh --toy            # toy sizes, any device (what tests/test_benchmarks_smoke.py runs)
exec bash "$(dirname "$0")/../benchmarks/gpu/check.sh" "$@"
