#!/usr/bin/env bash
# The one prepared GPU run (a lent H100, ~10 minutes, no network): builds mamba-ssm's kernel,
# runs the GPU tests and benchmarks, pretrains the landmark branch, trains FERMam on FER+ and
# evaluates it. Everything it returns lands under $OUT (at most 8 files, 16 MiB each).
#
# Inputs, carried in the git-ignored folder .gpu/ (see docs/training.md for how to make them):
#   train.packed.npz, val.packed.npz   FER+ splits (model.data.pack), pl_train.npz, pl_val.npz
#   (fermam pseudo-landmarks), mamba_ssm-*.tar.gz + build_mamba_ssm.sh, face_alignment wheel.
# Usage: OUT=/some/dir bash bench/gpu_session.sh [END_SECONDS]
set -u
END=${1:-575}                       # wall-clock second by which everything must be written
OUT=${OUT:-/tmp/fermam-out}
WORK=/tmp/fermam-work
mkdir -p "$OUT" "$WORK/logs" "$WORK/data"
T0=$(date +%s)
now() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(now)s] $*" | tee -a "$WORK/logs/session.log"; }
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD:$WORK/site:$WORK/mamba${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
FAST=${FAST:-0}                     # FAST=1: a CPU dry run of every step with tiny sizes

{ nvidia-smi -L; $PY -c "import torch,sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  > "$WORK/logs/device.txt" 2>&1
cat "$WORK/logs/device.txt"

# 1. mamba-ssm's kernel builds in the background while the GPU does other work.
if [ "$FAST" = 1 ]; then echo skipped > "$WORK/mamba.rc"; else
  # The Docker image's build steps (docker/build_mamba_ssm.sh), for sm_90 only to fit the lease;
  # the shared script is the fallback.
  ( { MAMBA_SDIST=.gpu/mamba_ssm-2.3.2.post1.tar.gz MAX_JOBS=14 bash docker/build_mamba_ssm.sh "9.0" "$WORK/wheels" \
      && $PY -m pip install -q --no-index --no-deps --target "$WORK/mamba" "$WORK"/wheels/mamba_ssm-*.whl; } \
      > "$WORK/logs/mamba_build.log" 2>&1 \
    || MAX_JOBS=14 bash .gpu/build_mamba_ssm.sh "$WORK/mamba" >> "$WORK/logs/mamba_build.log" 2>&1
    echo $? > "$WORK/mamba.rc" ) &
fi
$PY -m pip install -q --no-index --no-deps --target "$WORK/site" .gpu/face_alignment-*.whl > "$WORK/logs/pip.log" 2>&1

# 2. Data.
for split in train val; do $PY -m model.data.pack unpack ".gpu/$split.packed.npz" "$WORK/data/$split.npz"; done
say "data unpacked"
LIMIT=(); FM_EXTRA=(); LM_BUDGET=110
[ "$FAST" = 1 ] && LIMIT=(--limit 64 --batch-size 16) && FM_EXTRA=(--ir-units 1 1 1) && LM_BUDGET=5

# 3. Landmark branch: MobileFaceNet on dlib pseudo-labels (no scan: runs while mamba-ssm builds).
#    INIT_FROM=path/to/fermam.safetensors continues from those weights instead (their landmark
#    branch and template included), so this stage is skipped.
INIT_FROM=${INIT_FROM:-}
if [ -n "$INIT_FROM" ]; then
  FM_START=(--init-from "$INIT_FROM"); say "continuing from $INIT_FROM"
else
  FM_START=(--landmark-weights "$WORK/lm/landmarks.safetensors" --template-from .gpu/pl_train.npz)
  $PY -m service.cli train landmarks --data "$WORK/data/train.npz" --labels .gpu/pl_train.npz \
    --val-data "$WORK/data/val.npz" --val-labels .gpu/pl_val.npz --out "$WORK/lm" \
    --time-budget "$LM_BUDGET" --epochs 40 --no-progress "${LIMIT[@]}" > "$WORK/logs/train_landmarks.log" 2>&1
  say "landmarks rc=$? $(tail -n 1 "$WORK/logs/train_landmarks.log")"
fi

# 4. Face-stage speed on the GPU (face-alignment with random weights: speed only).
timeout 60 $PY bench/face_speed.py --backend face-alignment --device cuda --json \
  > "$WORK/logs/face_speed.json" 2> "$WORK/logs/face_speed.err"
say "face bench rc=$?"

# 5. Wait for the kernel (at most until second 260), then the GPU tests.
while [ ! -f "$WORK/mamba.rc" ] && [ "$(now)" -lt 260 ]; do sleep 2; done
say "mamba build rc=$(cat "$WORK/mamba.rc" 2>/dev/null || echo unfinished)"
$PY -c "import mamba_ssm, selective_scan_cuda; print('mamba_ssm', mamba_ssm.__version__)" >> "$WORK/logs/device.txt" 2>&1
# The GPU tests read ../shared/data; give them the unpacked split and, if carried, the photos.
mkdir -p ../shared/data/ferplus
[ -e ../shared/data/ferplus/val.npz ] || ln -s "$WORK/data/val.npz" ../shared/data/ferplus/val.npz
[ -d .gpu/photos ] && [ ! -e ../shared/data/photos ] && cp -r .gpu/photos ../shared/data/photos
timeout 90 $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/model --ignore=tests/model/test_scan.py \
  --ignore=tests/model/test_fermam.py > "$WORK/logs/pytest_gpu.log" 2>&1
say "gpu tests rc=$? $(tail -n 1 "$WORK/logs/pytest_gpu.log")"
# Train on the kernel only if it matched the PyTorch scan (the backend-parity tests); otherwise on
# the PyTorch scan.
if ! timeout 60 $PY -m pytest -m gpu -q -p no:cacheprovider tests/model/test_scan.py tests/model/test_fermam.py \
    > "$WORK/logs/pytest_scan_parity.log" 2>&1 \
  || ! $PY -c "from model.scan import available_backends as a; assert 'mamba' in a()" 2>/dev/null; then
  export FERMAM_SCAN_BACKEND=torch; say "training with the PyTorch scan"
fi

# 6. FERMam, with the budget left minus what evaluation and benchmarks need.
BUDGET=$(( END - $(now) - 85 )); [ "$FAST" = 1 ] && BUDGET=5
say "training FERMam for ${BUDGET}s"
$PY -m service.cli train fermam --train "$WORK/data/train.npz" --val "$WORK/data/val.npz" \
  "${FM_START[@]}" \
  --out "$WORK/fermam" --time-budget "$BUDGET" --epochs 200 --bn-recalibration 4096 --no-progress \
  "${LIMIT[@]}" "${FM_EXTRA[@]}" \
  > "$WORK/logs/train_fermam.log" 2>&1
say "fermam rc=$? $(tail -n 1 "$WORK/logs/train_fermam.log")"

# 7. Evaluation of the best epoch, and the model's speed with each scan backend.
$PY -m service.cli eval --data "$WORK/data/val.npz" --weights "$WORK/fermam/best.safetensors" --json \
  --confusion "$WORK/logs/confusion_val.png" > "$WORK/logs/eval_val.json" 2> "$WORK/logs/eval_val.err"
say "eval rc=$? $(head -c 300 "$WORK/logs/eval_val.json")"
unset FERMAM_SCAN_BACKEND
timeout $(( END - $(now) - 10 > 10 ? END - $(now) - 10 : 10 )) $PY bench/model_speed.py --devices cuda \
  --json "$WORK/logs/model_speed.json" > "$WORK/logs/model_speed.log" 2>&1
say "model bench rc=$?"

# 8. Results: the checkpoint in 15 MiB parts, everything else in one archive.
if [ -f "$WORK/fermam/best.safetensors" ]; then
  split -b 15M -d "$WORK/fermam/best.safetensors" "$OUT/fermam-ferplus.safetensors.part"
fi
cp "$WORK"/fermam/log.jsonl "$WORK/logs/train_fermam.jsonl" 2>/dev/null
cp "$WORK"/lm/log.jsonl "$WORK/logs/train_landmarks.jsonl" 2>/dev/null
cp "$WORK"/fermam/summary.json "$WORK/logs/summary_fermam.json" 2>/dev/null
cp "$WORK"/lm/summary.json "$WORK/logs/summary_landmarks.json" 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C "$WORK" logs
say "done"
cp "$WORK/logs/session.log" "$OUT/session.log"
