#!/usr/bin/env bash
# Issue 12, item 5: the Table 1 CIFAR-10 CNN column (every mode, 3 seeds, 20 epochs) on one lent GPU, as one prepared
# command. One process per mode, all at once: the wide LeNet-4 leaves a GPU mostly idle with a single run, and on
# this project's 2-core CPU the column is about 22 hours.
#
#   here, once:  mkdir -p .gpu_data && cp -r ../shared/data/cifar10-jpeg .gpu_data/
#   device run:  command="bash benchmarks/issue12/table1_cnn_gpu.sh", carry=[".gpu_data"], timeout_s=600
#
# Every process stops at LIMIT_SECONDS (default 540) if not done; the runner has written each finished epoch to its
# results.json by then, and $OUT/table1_cnn.tar.gz brings those and the logs back (no checkpoints). Read them with
#   tar -xzf table1_cnn.tar.gz && python benchmarks/table1_compare.py t1cnn/table1_cifar10_cnn --column cifar10_cnn
# MODES, EPOCHS, SEEDS (a YAML list) and EXTRA (more runner overrides) change the sweep; without a GPU (or with
# GPU_SESSION_SMOKE=1) a tiny version runs on the CPU, to check this script.
set -u
OUT=${OUT:-/tmp/table1_cnn_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
PY=${PYTHON:-python3}
data=${GPU_SESSION_DATA:-.gpu_data}
modes=${MODES:-bp fa usf brsf frsf dfa drtp grape dkp bwbpf fdfa}
epochs=${EPOCHS:-20} seeds=${SEEDS:-[0,1,2]} limit=${LIMIT_SECONDS:-540} extra=${EXTRA:-}
gpu=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
if [ "${GPU_SESSION_SMOKE:-0}" = 1 ] || [ "$gpu" != 1 ]; then
    modes=${MODES:-bp dfa grape fdfa} epochs=1 seeds="[0]" extra="-o data.limit=256 -o data.test_limit=256 $extra"
fi
$PY "$data/cifar10-jpeg/build_cifar10.py" /tmp/t1cnn_c10 > "$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
mkdir -p /tmp/t1cnn
for m in $modes; do
    config=configs/table1_cifar10_cnn.yaml types="[$m]"
    [ "$m" = fdfa ] && config=configs/table1_cifar10_cnn_fdfa.yaml  # dense feedback, a file of its own
    # shellcheck disable=SC2086
    # one experiment folder for every mode (<mode>/seed_<k> inside), so table1_compare.py reads the column at once
    timeout "$limit" $PY -m bio_ext.benchmark "$config" -o data.dataset_path=/tmp/t1cnn_c10 \
        -o "model.mode.type=$types" -o "experiment.seeds=$seeds" -o training.hyperparameters.epochs="$epochs" \
        -o experiment.output_dir=/tmp/t1cnn -o experiment.name=table1_cifar10_cnn -o infrastructure.threads=1 \
        $extra > /tmp/t1cnn/"$m".log 2>&1 &
done
wait
nvidia-smi --query-gpu=name,memory.total --format=csv > /tmp/t1cnn/device.txt 2>&1 \
    || echo "no GPU" > /tmp/t1cnn/device.txt
tar -czf "$OUT/table1_cnn.tar.gz" -C /tmp --exclude=checkpoint.pt t1cnn
$PY benchmarks/table1_compare.py /tmp/t1cnn/table1_cifar10_cnn --column cifar10_cnn | tee "$OUT/table1_cnn.md"
