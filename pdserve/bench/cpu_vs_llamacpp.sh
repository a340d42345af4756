#!/usr/bin/env bash
# The CPU path beside llama.cpp (docs/benchmarks.md, "The CPU path against llama.cpp"): `pdserve
# serve` as the README starts it and llama.cpp's llama-server on the same GGUF, one after the
# other on the same machine, each measured by `pdserve bench serve` (streaming /v1/completions,
# random prompts of IN tokens, OUTLEN output tokens, greedy, ignore_eos) at each concurrency.
# env: LLAMA_SERVER (path of a llama-server binary; unset: pdserve only), PDSERVE_FLAGS (extra
# serve flags, e.g. "--quantization none" or "--num-prefill-workers 1"), IN, OUTLEN,
# CONCS ("1:8 16:32" = concurrency:num_prompts), OUT (logs), THREADS (llama-server -t)
set -u
OUTDIR=${OUT:-/tmp/cpu_vs_llamacpp}; mkdir -p $OUTDIR
GGUF=$(python3 -c "from common.model_files import embedded_default_model as m; print(m().path)")
IN=${IN:-100}; OUTLEN=${OUTLEN:-128}; CONCS=${CONCS:-"1:8 16:32"}
wait_ready() {  # pid, url, name: seconds from now until the url answers
  local start=$(date +%s.%N)
  until curl -sf $2 >/dev/null; do kill -0 $1 2>/dev/null || { echo "$3 died"; return 1; }; sleep 0.1; done
  echo "$3 ready after $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')") s"
}
bench() {  # name, port
  for cn in $CONCS; do
    c=${cn%%:*}; n=${cn##*:}
    timeout ${BENCH_TIMEOUT:-900} python3 -m pdserve bench serve --base-url http://127.0.0.1:$2 --backend openai \
      --model SmolLM2-135M-Instruct --tokenizer "$GGUF" --dataset-name random --random-input-len $IN \
      --random-output-len $OUTLEN --num-prompts $n --max-concurrency $c --ignore-eos --disable-tqdm \
      --seed 0 --save-result --result-filename $OUTDIR/$1_c$c.json > $OUTDIR/bench_$1_c$c.log 2>&1
    echo "$1 c=$c rc=$?: $(grep -E 'Median TTFT|Median TPOT|Output token throughput' $OUTDIR/bench_$1_c$c.log | tr -s ' ' | tr '\n' ';')"
  done
}
pdserve serve --port 8030 ${PDSERVE_FLAGS:-} > $OUTDIR/pdserve.log 2>&1 &
pid=$!
wait_ready $pid http://127.0.0.1:8030/health pdserve && bench pdserve 8030
kill $pid; wait $pid 2>/dev/null
if [ -n "${LLAMA_SERVER:-}" ]; then
  $LLAMA_SERVER -m "$GGUF" -t ${THREADS:-2} -np 16 -c 8192 --port 8031 > $OUTDIR/llama-server.log 2>&1 &
  pid=$!
  wait_ready $pid http://127.0.0.1:8031/health llama-server && bench llama-server 8031
  kill $pid; wait $pid 2>/dev/null
fi
