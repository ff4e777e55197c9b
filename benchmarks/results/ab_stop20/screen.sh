#!/bin/bash
# Device: rebuild the model file, then one consolidation.py process per line of variants.txt; results tarred into $OUT every 20 s.
set -u
export SITE=${SITE:-/tmp/site} PART_A=${PART_A:-/root/m/part_a}
bash .dev/setup.sh || exit 1
export PYTHONPATH=$SITE OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.get_num_threads())"; nproc
S=/tmp/screen; mkdir -p $S; PIDS=()
while IFS='|' read -r name u cfg; do
  [ -z "$name" ] && continue
  timeout ${TL:-520} python3 benchmarks/consolidation.py --users 1 --first-user "$u" --threads 1 \
    --general .dev/general_english.txt --general-tokens 2048 --config "$cfg" --json $S/$name.json > $S/$name.log 2>&1 &
  PIDS+=($!)
done < ${VARIANTS:-.dev/variants.txt}
( while true; do sleep 20; tar czf $OUT/screen.tgz.tmp -C $S . && mv $OUT/screen.tgz.tmp $OUT/screen.tgz; done ) &
T=$!
wait "${PIDS[@]}"
sleep 1; kill $T; tar czf $OUT/screen.tgz -C $S .
for f in $S/*.log; do echo "== $(basename $f)"; tail -1 $f; done
