# Base all-MiniLM-L6-v2 on SciFact test, fp32 and bf16, with the grid's encoding settings (run from the repository root,
# 2026-12-04, on the AVX-512 (avx512_bf16) VM that ran the Table 1-2 runs; the Table 3 runs had an AVX2-only VM).
for dt in float32 bfloat16; do
  nvr eval --model sentence-transformers/all-MiniLM-L6-v2 --beir ../shared/data/scifact \
    --output docs/results/scifact/machine_check/base_$dt.json --dtype $dt --query_max_length 64 --max_length 128 \
    --batch_size 64 --cache_dir runs/machine/cache
done
