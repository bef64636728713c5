#!/usr/bin/env bash
# Submit the four runs (ResNet18/50 x pretrained/scratch), one slurm/train.sbatch job each.
#
#   slurm/sweep.sh SWEEP_DIR [sbatch options...] -- [key=value ...]
#   slurm/sweep.sh runs/sweep1 --nodes 2 --gpus-per-node 4 --partition gpu -- data.root=/data/eyepacs_512
#
# Each run writes SWEEP_DIR/<arm>/ and logs to SWEEP_DIR/<arm>/slurm-<job>.out. `python -m launch.sweep`
# does the same through submitit, and also checks ImageNet weights before submitting.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 SWEEP_DIR [sbatch options...] -- [key=value ...]" >&2
    exit 2
fi
sweep_dir=$1
shift
sbatch_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    sbatch_args+=("$1")
    shift
done
[ $# -gt 0 ] && shift  # the --
here=$(cd "$(dirname "$0")" && pwd)
configs=$(cd "$here/../configs" && pwd)

for arm in resnet18_pretrained resnet18_scratch resnet50_pretrained resnet50_scratch; do
    mkdir -p "$sweep_dir/$arm"
    sbatch --parsable --job-name "$arm" --output "$sweep_dir/$arm/slurm-%j.out" "${sbatch_args[@]}" \
        "$here/train.sbatch" --config "$configs/$arm.yaml" "output.dir=$sweep_dir/$arm" \
        "wandb.group=$(basename "$sweep_dir")" "$@" | sed "s/^/$arm: job /"
done
