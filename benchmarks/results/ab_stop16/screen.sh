#!/bin/bash
# Device screen: one consolidation.py process per line of variants.txt (name|user index|config), one thread each.
set -u
R=$PWD; S=/tmp/screen; mkdir -p $S
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
while IFS='|' read -r name u cfg; do
  [ -z "$name" ] && continue
  timeout ${TL:-530} python3 benchmarks/consolidation.py --users 1 --first-user "$u" --threads 1 \
    --general $R/.dev/general_english.txt --general-tokens 2048 --config "$cfg" --json $S/$name.json > $S/$name.log 2>&1 &
done < $R/.dev/variants.txt
wait
for f in $S/*.log; do echo "== $(basename $f)"; tail -2 $f; done
tar czf ${OUT:-/tmp}/screen.tgz -C $S .
