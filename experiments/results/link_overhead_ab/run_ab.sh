#!/bin/bash
# Link overhead at RTT 0, before vs after the per-round cuts (issue 13), interleaved on the same
# machine: "before" is commit 87b4281 (the bench with its --no-batching comparison, nothing cut
# yet), exported and laid out as the installed package would map it; "after" is this checkout.
# Each run is the same command: `edgespec bench link --json FILE` (defaults: k 4, 64 tokens,
# 3 prompts x 3 reps at RTT 0). The 87b4281 bench does not record the load average: this script
# logs it before each run (run_ab.log).
set -e
OLD=/tmp/link/old; PKG=/tmp/link/oldpkg; OUT=${OUT:-/tmp/link}
rm -rf $OLD $PKG && mkdir -p $OLD $PKG
git archive 87b4281 | tar -x -C $OLD
cp -r $OLD/sdk $PKG/edgespec
for d in core protos serving edge cloud orchestrator linkemu; do cp -r $OLD/$d $PKG/edgespec/$d; done
for i in 1 2 3; do
  echo "before$i start $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  PYTHONPATH=$PKG .venv/bin/edgespec bench link --json $OUT/before-$i.json 2>&1 | grep -A2 "^RTT 0"
  echo "after$i start $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/edgespec bench link --json $OUT/after-$i.json 2>&1 | grep -A2 "^RTT 0"
done
echo "end $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
