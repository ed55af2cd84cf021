#!/bin/bash
# Long training as a chain of N jobs: each trains until its time limit (checkpointing on the warning signal, no
# requeue), the next starts when it ends (afterany) and resumes from the run's latest checkpoint; jobs queued
# after the run has finished find it done and exit at once.
#
#   slurm/chain.sh N [sbatch options] SCRIPT [recipe and overrides]
#   slurm/chain.sh 10 --nodes=4 --gpus-per-node=8 --time=4:00:00 slurm/train.sbatch recipes/scale/XL.yaml
#   stdit slurm submit recipes/scale/XL.yaml --nodes 4 --gpus-per-node 8 --time 4:00:00 --dry-run > xl.sbatch
#   slurm/chain.sh 10 xl.sbatch
set -euo pipefail
if [ $# -lt 2 ] || ! [ "$1" -ge 1 ] 2> /dev/null; then
  echo "usage: $0 N [sbatch options] SCRIPT [recipe and overrides]  (N >= 1 jobs)" >&2; exit 2
fi
n=$1; shift
prev=
for i in $(seq "$n"); do
  job=$(STDIT_REQUEUE=0 sbatch --parsable --no-requeue ${prev:+--dependency=afterany:$prev} "$@")
  prev=${job%%;*}
  echo "job $i of $n: $prev"
done
