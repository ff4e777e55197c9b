#!/bin/bash
# Consolidation A/B screen: one `benchmarks/consolidation.py` per line of a variants file
# (name|ConsolidationConfig overrides as JSON|anchor: "" shipped, "plainonly" anchor_plain.txt alone,
# "plain" anchor.txt followed by anchor_plain.txt), all in parallel, one thread each.
# Stop 6 ran it on the device machine's 16 CPU cores (one process per core, ~200-350 s per user,
# runs cut at ~470 s); variants_1.txt and variants_2.txt are the two calls' lists.
#   USERS=3 OUTDIR=/tmp/screen bash benchmarks/results/ab_stop6/screen.sh benchmarks/results/ab_stop6/variants_1.txt
set -u
VARIANTS=$(realpath "$1"); USERS=${USERS:-3}; TL=${TL:-3600}; OUTDIR=$(realpath -m "${OUTDIR:-/tmp/screen}")
GENERAL=${GENERAL:-$(realpath "$(dirname "$0")/../../../../shared/data/general_english.txt")}
PRESETS=$(realpath "$(dirname "$0")/../../../model/presets")
mkdir -p "$OUTDIR"; cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
while IFS='|' read -r name cfg anchor; do
  [ -z "$name" ] && continue
  case "$anchor" in
    plain) a="--anchor $PRESETS/anchor.txt $PRESETS/anchor_plain.txt";;
    plainonly) a="--anchor $PRESETS/anchor_plain.txt";;
    *) a="--anchor $PRESETS/anchor.txt";;  # stop 5's shipped anchor
  esac
  timeout "$TL" python consolidation.py --users "$USERS" --general "$GENERAL" --general-tokens 4096 \
    --config "$cfg" $a --json "$OUTDIR/$name.json" > "$OUTDIR/$name.log" 2>&1 &
done < "$VARIANTS"
wait
