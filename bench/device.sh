#!/usr/bin/env bash
# One GPU session's measurements, each step time-boxed, tables to $OUT (default bench/out/) for bench/RESULTS.md.
#
#   bash bench/device.sh                 # on the GPU machine (the device tool: run "bash bench/device.sh", carry .whl)
#   SMALL=1 bash bench/device.sh         # the same steps at toy sizes (a dry run on any machine, minutes on a CPU)
#
# The GPU machine has jax, flax, optax, orbax and torch but not grain, ml_collections or tensorflow-datasets, and
# no network: put their wheels in .whl/ first (here: pip download grain ml_collections etils array_record
# simple_parsing -d .whl --no-deps --python-version 3.11 --only-binary=:all:), and this script installs them with
# --no-index. Steps: (1) versions; (2) the lowering table for this device kind (measuring every grouped conv of
# ResNeXt-50 and ShuffleNet v2, Pallas included, time printed); (3) bench/models.py against PyTorch eager and
# torch.compile with that table; (4) members: K = 1, 2, 4, 8 ResNeXt-29 8x64d runs in one program; (5) launch.py
# training end to end: experiments/cifar10_resnext29.py:local, and its img/s beside bench/models.py's.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export GCONV_LOWERING_TABLES="$OUT/tables" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() {  # step NAME SECONDS COMMAND...: runs it time-boxed, its output to $OUT/NAME.txt and here
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "   exit $? after $((SECONDS - start)) s"; tail -n 25 "$OUT/$name.txt"
}
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --find-links .whl .whl/*.whl; fi
step versions 60 python3 -c "import jax, flax, optax, orbax.checkpoint as o; print(jax.devices(), jax.__version__, flax.__version__, optax.__version__, o.__version__)"
if [ "${SMALL:-0}" = 1 ]; then
  step table 300 python3 bench/lowering_table.py --models resnext11_4x6d --image 8,8,1 --batch 8 --dtype float32 --out "$OUT/tables"
  step models 300 python3 bench/models.py --models resnext50_32x4d --res 64 --batch 2 --steps 2 --warmup 1 --dtype float32 --no-compile
  step members 300 python3 bench/members.py --members 1,2 --steps 3
  step launch 300 python3 launch.py --config experiments/default.py:local --point c2 --workdir "$OUT/runs" --skip_analysis
else
  step table 120 python3 bench/lowering_table.py --models resnext50_32x4d,shufflenet_v2_x1_0 --batch 256 --out "$OUT/tables"
  step models 180 python3 bench/models.py --steps 10 --warmup 3
  step members 90 python3 bench/members.py --model resnext29_8x64d --image 32,32,3 --batch 128 --members 1,2,4,8 --steps 10
  step launch 90 python3 launch.py --config experiments/cifar10_resnext29.py:local --workdir "$OUT/runs" --skip_analysis
fi
