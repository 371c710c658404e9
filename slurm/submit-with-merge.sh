#!/usr/bin/env bash
# Submit a training job and, after it, the provenance merge (template 5):
#
#   slurm/submit-with-merge.sh TEMPLATE [sbatch options for the training job...]
#   slurm/submit-with-merge.sh slurm/torchrun-multi-node.sbatch --nodes=4
#
# The merge job (slurm/merge-after.sbatch, or MERGE_TEMPLATE) depends on the
# training job with `afterany`, so it runs even when training fails, and gets
# TRAIN_JOB_ID in its environment; the PROV4ML_* variables of this shell reach
# both jobs (sbatch exports the environment). MERGE_SBATCH_ARGS adds sbatch
# options for the merge job (word-split), e.g. "--partition=cpu --mem=16G".
# Prints "TRAIN_JOB_ID MERGE_JOB_ID"; the training job id as soon as it is
# submitted, so that a failed merge submission (exit 1, message on stderr) still
# says which job was started.
set -euo pipefail

if [ "$#" -lt 1 ]; then
    sed -n '2,15p' "$0" >&2
    exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
template="$1"
shift
MERGE_TEMPLATE="${MERGE_TEMPLATE:-$HERE/merge-after.sbatch}"

train="$(sbatch --parsable "$@" "$template")"
train="${train%%;*}"   # --parsable prints "id" or "id;cluster"
printf '%s' "$train"
# shellcheck disable=SC2086
if ! merge="$(TRAIN_JOB_ID="$train" sbatch --parsable --dependency="afterany:$train" \
        ${MERGE_SBATCH_ARGS:-} "$MERGE_TEMPLATE")"; then
    echo
    echo "submit-with-merge: training job $train submitted, but not the merge job; merge it later with" \
         "TRAIN_JOB_ID=$train sbatch $MERGE_TEMPLATE, or prov4ml-dist merge RUN_DIR" >&2
    exit 1
fi
echo " ${merge%%;*}"
