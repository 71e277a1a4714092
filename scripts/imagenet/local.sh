#!/usr/bin/env bash
# Single-machine variant: run a recipe with RANKS_PER_NODE MPI ranks on this machine (mpiexec), each
# with cores / RANKS_PER_NODE threads (one process with all cores when RANKS_PER_NODE=1).
#
#   DATA=/path/to/imagenet RANKS_PER_NODE=2 bash scripts/imagenet/local.sh binaryvit_deit_s
#
# Several single-threaded ranks are usually faster than one many-threaded process on a busy machine
# (docs/scaling.md, "Measured on this machine"); use ACCUM_STEPS to keep the global batch on little memory.
set -euo pipefail
RECIPE=${1:?usage: local.sh binaryvit_deit_s|tervit_deit_s|gsb_deit_s}
export NODES=1 RANKS_PER_NODE=${RANKS_PER_NODE:-1}
unset SLURM_JOB_ID  # never srun from here
exec bash "$(dirname "${BASH_SOURCE[0]}")/$RECIPE.sh"
