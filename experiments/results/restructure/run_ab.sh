#!/bin/bash
# Interleaved before/after on the same machine under the same load.
B=/tmp/wt-before; A=/tmp/wt-after; O=/tmp/bench-ab
before() { (cd $B && PYTHONPATH=$B /work/main/.venv/bin/python -m edgespec.cli "$@"); }
after() { (cd /tmp && $A/.venv/bin/edgespec "$@"); }
for rep in 1; do
  before bench core --reps 2 --max-k 4 --json $O/core-before-$rep.json > $O/core-before-$rep.log 2>&1
  after bench core --reps 2 --max-k 4 --json $O/core-after-$rep.json > $O/core-after-$rep.log 2>&1
  before bench link --reps 2 --json $O/link-before-$rep.json > $O/link-before-$rep.log 2>&1
  after bench link --reps 2 --json $O/link-after-$rep.json > $O/link-after-$rep.log 2>&1
  echo "rep $rep done $(date)" >> $O/progress.log
done
