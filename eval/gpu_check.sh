#!/usr/bin/env bash
# The GPU check, one command for one H200 in under 9 minutes: the CUDA half of the kernel tests, the LIF, model,
# attention and generation benchmarks (the attention's with issue 16's targets), the spiking model trained at
# block 1024 with batch 16 for a few steps, and both shakespeare-char configs trained for as many steps as the time
# allows.
#
#   eval/gpu_check.sh OUTDIR
#
# Every output lands in OUTDIR (a new or empty folder): one log per stage, the benchmarks' JSON, the training
# runs with their metrics.csv, train_summary.json (val loss, mean firing rate, tokens/s per run; the block-1024
# run's peak GPU memory as nvidia-smi saw it) and status.txt (each stage's exit status). Settings, from the
# environment:
#   SOFTMAX_STEPS (2500), SPIKING_STEPS (1500): training steps (--trainer.max_steps) of each run; each is also
#   stopped at its share of the time left (Lightning's max_time), so the whole check ends in time.
#   SPIKING_LM_DATA_DIR: a folder with tinyshakespeare.txt (default ../shared/data); the GPU machine has no network.
# Packages the GPU machine lacks are installed from wheels in .whl/ if there are any (README: "GPU check").
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: eval/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
if [ -n "$(ls -A "$OUT")" ]; then
    echo "gpu_check: error: $OUT is not empty; give a new folder (nothing was overwritten)" >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$OUT"  # python runs from here: the checkout's own spiking_lm/ folder must not shadow the package below
START=$SECONDS
BUDGET=${BUDGET_S:-530}  # seconds for everything, under the 9 minutes
: "${SOFTMAX_STEPS:=2500}" "${SPIKING_STEPS:=1500}"
export SPIKING_LM_DATA_DIR=${SPIKING_LM_DATA_DIR:-$(dirname "$REPO")/shared/data}
export WANDB_MODE=offline TRITON_CACHE_DIR="$OUT/triton_cache"
unset TRITON_INTERPRET
PY=python3

FAILED=0
# stage NAME SECONDS CMD...: run CMD with a time limit, its output in OUTDIR/NAME.log, its status in status.txt
stage() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s, $((SECONDS - START))s in)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $((SECONDS - START))s" >>"$OUT/status.txt"
    tail -n 25 "$OUT/$name.log"
    [ $rc -eq 0 ] || FAILED=1
}

# 1. What the GPU machine lacks: the wheels in .whl/, and this checkout as the spiking_lm package, laid out as
# the editable install does (kernels/, train/ and eval/ as its subpackages) with symlinks, plus the
# spiking-lm command of pyproject.toml's [project.scripts].
SITE=/tmp/spiking_lm_site SRC=/tmp/spiking_lm_src
rm -rf "$SRC" && mkdir -p "$SRC/spiking_lm" "$SRC/bin"
ln -s "$REPO"/spiking_lm/* "$SRC/spiking_lm/"
for sub in kernels train eval; do ln -s "$REPO/$sub" "$SRC/spiking_lm/$sub"; done
ENTRY=$($PY -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["scripts"]["spiking-lm"])' \
    "$REPO/pyproject.toml")
printf '#!/usr/bin/env python3\nimport sys\nfrom %s import %s\nsys.exit(%s())\n' "${ENTRY%%:*}" "${ENTRY##*:}" \
    "${ENTRY##*:}" >"$SRC/bin/spiking-lm"
chmod +x "$SRC/bin/spiking-lm"
export PYTHONPATH="$SRC:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SRC/bin:$PATH"
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    stage install_wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$REPO"/.whl/*.whl
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
    git -C "$REPO" rev-parse HEAD
    date -u +%FT%TZ
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# 2. The CUDA half of the kernel tests: every kernel test file on the cuda device, the GPU-only sizes, and the
# compiled attention against the reference (tests/test_spiking_attention_cuda.py).
stage kernel_tests 170 $PY -m pytest -q -p no:cacheprovider -k cuda "$REPO"/tests/test_lif_kernels.py \
    "$REPO"/tests/test_lif_kernels_cuda.py $(ls "$REPO"/tests/test_*attention*.py 2>/dev/null) \
    --junitxml="$OUT/kernel_tests.xml"

# 3. Benchmarks.
stage bench_lif 100 $PY -m spiking_lm.eval.bench_lif --out "$OUT/bench_lif.json"
stage bench_model 100 $PY -m spiking_lm.eval.bench_model --rounds 3 --out "$OUT/bench_model.json"
# Issue 16's targets (bench_attention.TARGETS): the attention alone at B 16, 6 heads of 64, S 4, bf16; the verdicts
# are at the end of the log and in the JSON's "targets".
stage bench_attention 120 $PY -m spiking_lm.eval.bench_attention --scope core --batch 16 --heads 6 --head-size 64 \
    --timesteps 4 --blocks 256,1024 --precision bf16-mixed --out "$OUT/bench_attention.json"
# Issue 18: sampling with and without the KV cache, both models at the shakespeare-char size, one round.
stage bench_generate 90 $PY -m spiking_lm.eval.bench_generate --device cuda --sizes shakespeare-char --rounds 1 \
    --out "$OUT/bench_generate.json"

# 4. Issue 16: the spiking model (dropout 0.2, so attention dropout too) trains at block 1024 with batch 16. A few
# steps, one short validation; nvidia-smi samples the GPU's memory meanwhile.
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$OUT/block1024_memory_mib.txt" 2>&1 &
SAMPLER=$!
stage train_spiking_block1024 150 spiking-lm fit --config "$REPO/configs/shakespeare_char_spiking.yaml" \
    --data.block_size 1024 --data.batch_size 16 --data.val_batches 4 --trainer.max_steps 40 \
    --trainer.val_check_interval 20 --trainer.max_time 00:00:01:45 \
    --trainer.default_root_dir "$OUT/train_spiking_block1024" \
    --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir "$OUT/train_spiking_block1024"
kill "$SAMPLER" 2>/dev/null

# 5. Train both configs, each stopped at half of the time left at the latest (the softmax run is the faster).
train() {
    local name=$1 steps=$2 left=$(( BUDGET - (SECONDS - START) ))
    local share=$(( left / $3 - 30 ))  # 30 s for startup and the last validation
    if [ $share -lt 60 ]; then
        echo "train_$name: skipped, ${left}s left" | tee -a "$OUT/status.txt"
        FAILED=1
        return
    fi
    stage "train_$name" $(( share + 60 )) spiking-lm fit --config "$REPO/configs/shakespeare_char_$name.yaml" \
        --trainer.max_steps "$steps" --trainer.max_time "$(printf '00:00:%02d:%02d' $((share / 60)) $((share % 60)))" \
        --trainer.default_root_dir "$OUT/train_$name" \
        --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir "$OUT/train_$name"
}
train softmax "$SOFTMAX_STEPS" 2
train spiking "$SPIKING_STEPS" 1

# Val loss, mean firing rate and tokens/s of each run, from its metrics.csv.
$PY - "$OUT" <<'EOF' | tee "$OUT/train_summary.txt"
import csv, json, pathlib, statistics, sys

out = pathlib.Path(sys.argv[1])
summary = {}
for run in ("softmax", "spiking", "spiking_block1024"):
    rows = [r for f in sorted((out / f"train_{run}").rglob("metrics.csv")) for r in csv.DictReader(f.open())]
    def column(name):
        return [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]
    val, rate, tps = column("val_loss"), column("val_firing_rate/mean_neuron_weighted"), column("tokens_per_s")
    summary[run] = {
        "steps": 1 + max((s for s, _ in column("train_loss")), default=-1),  # logged steps count from 0
        "best_val_loss": min((v for _, v in val), default=None),
        "last_val_loss": val[-1][1] if val else None,
        "val_firing_rate_mean": rate[-1][1] if rate else None,
        "tokens_per_s_median": statistics.median(v for _, v in tps) if tps else None,
    }
memory = (out / "block1024_memory_mib.txt").read_text().split() if (out / "block1024_memory_mib.txt").exists() else []
summary["spiking_block1024"]["peak_gpu_memory_mib"] = max((int(m) for m in memory if m.isdigit()), default=None)
(out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF

echo "== done in $((SECONDS - START))s; status:"
cat "$OUT/status.txt"
exit $FAILED
