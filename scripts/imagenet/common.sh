# Shared by the recipe scripts (sourced, not run). Settings come from the environment:
#
#   DATA            the ImageNet root (train/<wnid>/*.JPEG and val/, docs/imagenet.md) or "hub"
#                   (ILSVRC/imagenet-1k through `datasets`, after `huggingface-cli login`)   [required]
#   OUT             run directory (default runs/imagenet-<recipe>)
#   NODES           nodes (default: SLURM_JOB_NUM_NODES, else 1)
#   RANKS_PER_NODE  MPI ranks per node (default: SLURM_NTASKS_PER_NODE, else 1)
#   THREADS         Numba/BLAS threads per rank (default: cores per node / RANKS_PER_NODE)
#   WORKERS         JPEG-decoding worker processes per rank (default 4; docs/imagenet.md sizes them)
#   ACCUM_STEPS     gradient accumulation micro-steps, to reach the global batch on small nodes (default 1)
#   HOSTFILE        hosts for mpiexec outside SLURM (optional)
#   PYTHON          the interpreter (default: python)
#   DRY_RUN=1       print the estimate and the commands, run nothing
#   ESTIMATE_ARGS   extra arguments for estimate.py (e.g. a tiny model in tests)
#
# Launch: under SLURM `srun --kill-on-bad-exit=1` (a rank that dies ends the job step), otherwise
# `mpiexec -n NODES*RANKS_PER_NODE` when that is > 1, otherwise plain python. The global batch
# (--batch-size) means the same on any number of ranks: each rank computes its slice of it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

: "${DATA:?set DATA to the ImageNet root (train/<wnid>/*.JPEG, val/) or DATA=hub}"
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/imagenet-$RECIPE}
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
RANKS_PER_NODE=${RANKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
RANKS_PER_NODE=${RANKS_PER_NODE%%(*}  # SLURM writes e.g. "4(x2)"
CORES=$(nproc)
THREADS=${THREADS:-$(( CORES / RANKS_PER_NODE > 0 ? CORES / RANKS_PER_NODE : 1 ))}
WORKERS=${WORKERS:-4}
ACCUM_STEPS=${ACCUM_STEPS:-1}
DRY_RUN=${DRY_RUN:-0}
ESTIMATE_ARGS=${ESTIMATE_ARGS:-}
RANKS=$(( NODES * RANKS_PER_NODE ))
export NUMBA_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS

# DeiT-S, as all three papers (the minibvit preset deit-small: 224, patch 16, 384 wide, 12 blocks, 6 heads)
COMMON_ARGS=(--dataset imagenet --data-dir "$DATA" --model deit-small --image-size 224
             --workers "$WORKERS" --accum-steps "$ACCUM_STEPS")

estimate() {  # estimate <method> <stage=epochs,...>: time per epoch and node-hours, measured here
    echo "== $RECIPE: $RANKS rank(s) on $NODES node(s), $THREADS thread(s) per rank; measuring one training step per stage ..."
    # one process with all of this node's cores stands for a node
    # shellcheck disable=SC2086
    NUMBA_NUM_THREADS=$CORES OMP_NUM_THREADS=$CORES OPENBLAS_NUM_THREADS=$CORES \
        "$PYTHON" scripts/imagenet/estimate.py --method "$1" --stage-epochs "$2" --nodes "$NODES" $ESTIMATE_ARGS
}

train() {  # train <python -m minibvit.train arguments>
    local launcher=()
    if [ "$RANKS" -gt 1 ]; then
        if [ -n "${SLURM_JOB_ID:-}" ]; then
            launcher=(srun --kill-on-bad-exit=1 --ntasks="$RANKS" --ntasks-per-node="$RANKS_PER_NODE")
        else
            launcher=(mpiexec -n "$RANKS" ${HOSTFILE:+-f "$HOSTFILE"})
        fi
    fi
    local cmd=("${launcher[@]}" "$PYTHON" -m minibvit.train "${COMMON_ARGS[@]}" "$@")
    echo "+ ${cmd[*]}"
    if [ "$DRY_RUN" != 1 ]; then
        "${cmd[@]}"
    fi
}
