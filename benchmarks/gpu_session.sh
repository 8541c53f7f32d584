#!/usr/bin/env bash
# The device checks of a session lent a GPU, as one prepared command (about 5 minutes; within timeout_s=600 with the
# Table 2 stage too):
#
#   here, once:  mkdir -p .gpu_data && cp -r ../shared/data/cifar10-jpeg ../shared/data/tinyshakespeare .gpu_data/
#   device run:  command="bash benchmarks/gpu_session.sh", carry=[".gpu_data"], timeout_s=600
#
# (.gpu_data is git-ignored; ../shared beside the checkout does not travel to the device machine; the two datasets
# are 20 MB.) A session has 15 minutes of device time, starts included: this, then
# benchmarks/issue12/table1_cnn_gpu.sh with LIMIT_SECONDS=420 (issue 12's Table 1 CNN column), fit in one.
# Each stage runs under its own time limit and writes $OUT/<stage>.log; a stage that runs out of time or fails
# does not stop the others. Stages:
# - the device;
# - the CUDA tests: tests/test_cuda.py, the tests named cuda in tests/test_zoo.py and tests/test_mixed_precision.py;
# - step time against backprop on the device: benchmarks/step_time.py (MLP, CNN, resnet18) and
#   benchmarks/char_lm.py (the char GPT-2, macro and per layer);
# - with TABLE2_EPOCHS=N (N > 0; default 0: skipped), issue 12's Table 2 (configs/table2_cifar10_vgg16.yaml: backprop,
#   DFA and GrAPE with dense feedback, seed 0, the whole CIFAR-10) for N epochs or TABLE2_SECONDS (default 150); the
#   runner keeps each finished epoch, and $OUT/table2.tar.gz brings the results back.
# Without a GPU (or with GPU_SESSION_SMOKE=1) every stage runs a tiny version on the CPU, to check this script.
set -u
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
smoke=${GPU_SESSION_SMOKE:-0}
$PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || smoke=1
data=${GPU_SESSION_DATA:-.gpu_data}

stage() {  # stage NAME SECONDS COMMAND...: run, log, report the exit status and the time taken
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1
    echo "stage $name: exit $? after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

stage device 60 bash -c "nvidia-smi || true; $PY -c 'import torch, transformers; print(torch.__version__, \
torch.version.cuda, transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'"

if [ "$smoke" = 1 ]; then
    stage tests 300 env BIO_EXT_TEST_DEVICE=cpu $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
    stage step_time 120 $PY benchmarks/step_time.py --models mlp --modes dfa,grape --rounds 1 --no-biotorch
    lm_args="--rounds 1 --batch 2"
    table2=(-o data.limit=64 -o data.test_limit=64 -o training.hyperparameters.batch_size=32
            -o "model.architecture=cnn" -o "model.mode.convert={}")
else
    stage tests 120 $PY -m pytest -q -p no:cacheprovider -k cuda tests/test_cuda.py tests/test_zoo.py \
        tests/test_mixed_precision.py
    stage step_time 100 $PY benchmarks/step_time.py --models mlp,cnn,resnet18 --rounds 5 --no-biotorch \
        --modes dfa,grape,grape:directions=2,dfa:conv_feedback=dense,grape:conv_feedback=dense
    lm_args="--rounds 5"
    table2=()
fi
stage char_lm 90 $PY benchmarks/char_lm.py --no-train --data "$data" --out "$OUT/char_lm.jsonl" $lm_args \
    --runs backprop,dfa:macro,grape:macro,grape:micro,dfa:layer,grape:layer,grape:layer:directions=2

if [ "${TABLE2_EPOCHS:-0}" -gt 0 ] && [ -d "$data/cifar10-jpeg" ]; then
    $PY "$data/cifar10-jpeg/build_cifar10.py" /tmp/gpu_session_c10 > "$OUT/table2.log" 2>&1
    stage table2 ${TABLE2_SECONDS:-150} $PY -m bio_ext.benchmark configs/table2_cifar10_vgg16.yaml \
        -o data.dataset_path=/tmp/gpu_session_c10 -o "experiment.seeds=[0]" -o experiment.output_dir=/tmp/gpu_runs \
        -o training.hyperparameters.epochs="$TABLE2_EPOCHS" "${table2[@]}"
    tar -czf "$OUT/table2.tar.gz" -C /tmp/gpu_runs --exclude=checkpoint.pt . 2>/dev/null
else
    echo "stage table2: skipped (TABLE2_EPOCHS unset, or no $data/cifar10-jpeg)" | tee -a "$OUT/summary.txt"
fi
cat "$OUT/summary.txt"
