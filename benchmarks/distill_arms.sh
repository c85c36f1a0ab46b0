#!/usr/bin/env bash
# Issue 24's four-arm comparison (docs/results.md, "Distillation from the dense model"): one dense model, then
# for every (target, seed) cell four arms at equal training steps after the dense phase:
#   A  the paper's method            prune PRUNE steps
#   B  + distillation while pruning  prune PRUNE steps, distill.kl_weight 1, temperature 2
#   C  + recovery fine-tuning        prune PRUNE-FT steps, then finetune FT steps
#   D  both                          as C, the teacher in prune and finetune
# Every cell is its own run directory holding a copy of the dense phase; its test perplexity (the whole test
# split, memory carried) lands in CELL/test.txt. Resumable: a cell with test.txt is skipped.
#
#   ALLATT_DATA=../shared/data/wikitext-2-mini bash benchmarks/distill_arms.sh          # the quickstart
#   R=runs/arms_txl Q=tune_configs/compare_txl.yaml KNOB=gates.param_budget VALUES="400000 340000 280000" \
#     PRUNE=300 EXTRA="--set model.architecture=transformer_xl" bash benchmarks/distill_arms.sh
#   python3 benchmarks/distill_table.py runs/arms                                       # the table
#
# ADDR=HOST:PORT joins a running Ray (saves each command's start of a local one).
set -uo pipefail
R=${R:-runs/arms} Q=${Q:-tune_configs/quickstart.yaml} KNOB=${KNOB:-gates.sparsity_target}
VALUES=${VALUES:-0.25 0.5 0.75} SEEDS=${SEEDS:-0 1} ARMS=${ARMS:-A B C D} PRUNE=${PRUNE:-250} FT=${FT:-50}
EXTRA=${EXTRA:-}
common="--no-progress ${ADDR:+--address $ADDR} $EXTRA"
distill="--set distill.kl_weight=1 --set distill.temperature=2"
mkdir -p "$R"
log() { echo "$(date +%T) $*" | tee -a "$R/progress.log"; }
if [ ! -e "$R/dense/dense/model" ]; then
  log "dense"
  allatt-dist train "$Q" --out "$R/dense" --phase dense $common > "$R/dense.log" 2>&1 || { log "dense FAILED"; exit 1; }
fi
for v in $VALUES; do for s in $SEEDS; do for arm in $ARMS; do
  case $arm in
    A) opts="--set prune.max_steps=$PRUNE" ;;
    B) opts="--set prune.max_steps=$PRUNE $distill" ;;
    C) opts="--set prune.max_steps=$((PRUNE - FT)) --set finetune.max_steps=$FT" ;;
    D) opts="--set prune.max_steps=$((PRUNE - FT)) --set finetune.max_steps=$FT $distill" ;;
    *) echo "unknown arm $arm (A B C D)"; exit 2 ;;
  esac
  cell="$R/$arm/v${v}_s$s"
  [ -s "$cell/test.txt" ] && continue
  mkdir -p "$cell"; rm -rf "$cell/dense"; cp -r "$R/dense/dense" "$cell/dense"
  sets="--set $KNOB=$v --set train.seed=$s $opts"
  log "$arm $KNOB=$v seed=$s"
  allatt-dist train "$Q" --out "$cell" --phase prune --force $common $sets > "$cell/prune.log" 2>&1 \
    || { log "$arm $v $s: prune FAILED"; continue; }
  model="$cell/prune/pruned"
  case $arm in C|D)
    allatt-dist train "$Q" --out "$cell" --phase finetune --force $common $sets > "$cell/finetune.log" 2>&1 \
      || { log "$arm $v $s: finetune FAILED"; continue; }
    model="$cell/finetune/model" ;;
  esac
  allatt-dist evaluate "$model" --split test --batch-size 8 > "$cell/test.tmp" 2> "$cell/eval.log" \
    && mv "$cell/test.tmp" "$cell/test.txt"
done; done; done
log "done"
