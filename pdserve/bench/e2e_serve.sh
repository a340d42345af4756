#!/usr/bin/env bash
# pdserve bench serve against (a) the aggregated engine and (b) 1 prefill + 1 decode process on one
# machine (docs/benchmarks.md, "End to end on one H100"). Model folder: pdserve bench make-model DIR
# env: MODEL, ENGINE (extra engine flags), IN, OUTLEN, CONCS ("1:8 8:32 64:128" = concurrency:num_prompts), CONNECTOR,
# BENCH_ARGS (extra bench serve flags, e.g. --save-detailed), MODES ("agg disagg")
set -u
OUTDIR=${OUT:-/tmp/e2e5}; mkdir -p $OUTDIR
run_one() {  # name, extra serve flags
  local name=$1; shift
  python3 -m pdserve serve --port 8011 --model $MODEL --load-format dummy $ENGINE "$@" > $OUTDIR/serve_$name.log 2>&1 &
  local pid=$!
  for i in $(seq 1 ${STARTUP_S:-300}); do curl -sf localhost:8011/health >/dev/null && break; kill -0 $pid 2>/dev/null || { echo "$name: serve died"; tail -20 $OUTDIR/serve_$name.log; return 1; }; sleep 1; done
  for cn in $CONCS; do
    c=${cn%%:*}; n=${cn##*:}
    timeout ${BENCH_TIMEOUT:-200} python3 -m pdserve bench serve --base-url http://localhost:8011 --tokenizer $MODEL \
      --dataset-name random --random-input-len $IN --random-output-len $OUTLEN --num-prompts $n --max-concurrency $c \
      --ignore-eos --disable-tqdm ${BENCH_ARGS:-} --save-result --result-filename $OUTDIR/${name}_c$c.json > $OUTDIR/bench_${name}_c$c.log 2>&1
    echo "$name c=$c rc=$?: $(grep -E 'Median TTFT|Median TPOT|Output token throughput' $OUTDIR/bench_${name}_c$c.log | tr -s ' ' | tr '\n' ';')"
  done
  kill $pid; wait $pid 2>/dev/null
}
MODES=${MODES:-agg disagg}
for mode in $MODES; do
  case $mode in
    agg) run_one agg --num-prefill-workers 0 ;;
    disagg) run_one disagg --num-prefill-workers 1 --local-prefill-threshold 0 --kv-transfer-config "{\"kv_connector\":\"$CONNECTOR\",\"kv_role\":\"kv_both\"}" ;;
    *) echo "unknown mode $mode (agg, disagg)"; exit 2 ;;
  esac
done
