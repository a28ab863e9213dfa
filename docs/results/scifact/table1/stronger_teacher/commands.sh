set -e
cd /work/main
export HF_HUB_OFFLINE=1
T=runs/cranfield_teacher   # scratch folder; the two JSONs were copied next to this script
.venv/bin/nvr fit --config configs/fit/quickstart_minilm_cranfield.yaml --trainer.default_root_dir $T/fit > $T/fit.log 2>&1
for m in base trained; do
  if [ $m = base ]; then M=sentence-transformers/all-MiniLM-L6-v2; else M=$T/fit/checkpoints/last.ckpt; fi
  /usr/bin/time -v .venv/bin/nvr eval --model $M --beir ../shared/data/scifact --split train --query_max_length 64 --max_length 128 --dtype float32 --output $T/${m}_scifact_train.json --overwrite true > $T/eval_$m.log 2>&1
done
echo done > $T/DONE
