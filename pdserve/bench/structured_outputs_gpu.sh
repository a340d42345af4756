#!/usr/bin/env bash
# Structured outputs on a GPU (docs/benchmarks.md): the bitmask kernel test, bench decode-step
# --structured-outputs, then bench serve with the json dataset constrained and free, alternated, on one
# aggregated server. env: MODEL (pdserve bench make-model DIR), GRAMMAR_TOKENIZER (optional),
# SERVE_EXTRA (extra serve flags), SERVE_ONLY=1 (skip the first two), OUT (logs)
set -u
OUT=${OUT:-/tmp/structured-gpu}; mkdir -p $OUT

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -z "${SERVE_ONLY:-}" ]; then
python -m pytest -q -p no:cacheprovider tests/structured_output/test_apply_bitmask_gpu.py > $OUT/kernel_test.txt 2>&1; echo "kernel test rc=$?: $(tail -1 $OUT/kernel_test.txt)"
python -m pdserve.cli.main bench decode-step --batch-sizes 64 --context-len 1024 --no-hf --structured-outputs ${GRAMMAR_TOKENIZER:+--grammar-tokenizer $GRAMMAR_TOKENIZER} --engine-steps 64 --json $OUT/step.json > $OUT/step.txt 2>&1; echo "decode-step rc=$?"; grep -E "^B=64: (engine|bitmask)|^engine B" $OUT/step.txt
fi
M=${MODEL:?set MODEL to a folder from pdserve bench make-model}
python -m pdserve serve --port 8011 --model $M --load-format dummy --dtype bfloat16 --max-model-len 4096 --kv-cache-memory-bytes 19G --max-num-seqs 64 --num-prefill-workers 0 ${SERVE_EXTRA:-} > $OUT/serve.log 2>&1 &
pid=$!
for i in $(seq 1 240); do curl -sf localhost:8011/health >/dev/null && break; kill -0 $pid 2>/dev/null || { echo "serve died"; tail -20 $OUT/serve.log; exit 1; }; sleep 1; done
for run in "json 1" "free 0" "json2 1" "free2 0"; do
  set -- $run
  timeout 240 python -m pdserve bench serve --base-url http://localhost:8011 --tokenizer $M --backend openai-chat --dataset-name json --structured-output-ratio $2 --num-prompts 256 --max-concurrency 64 --disable-tqdm --save-result --result-filename $OUT/serve_$1.json > $OUT/bench_$1.log 2>&1
  echo "$1 rc=$?: $(grep -iE 'Successful requests|Output token throughput|Request throughput|Median TPOT|Median TTFT|correct|Total generated' $OUT/bench_$1.log | tr -s ' ' | tr '\n' ';')"
done
kill $pid; wait $pid 2>/dev/null
