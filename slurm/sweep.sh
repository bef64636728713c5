#!/usr/bin/env bash
# Submit the arms of a sweep file (default configs/sweep.yaml: the four runs ResNet18/50 x
# pretrained/scratch), one slurm/train.sbatch job each. The arms are read from the sweep file through
# `python -m launch.sweep --print-arms`, so they are defined in one place.
#
#   slurm/sweep.sh SWEEP_DIR [sbatch options...] -- [key=value ...]
#   slurm/sweep.sh runs/sweep1 --nodes 2 --gpus-per-node 4 --partition gpu -- data.root=/data/eyepacs_512
#
# Each run writes SWEEP_DIR/<arm>/ and logs to SWEEP_DIR/<arm>/slurm-<job>.out. Environment: PYTHON
# (default python3, with dr_resnet installed), SWEEP_FILE (default configs/sweep.yaml), DRY_RUN=1
# (print the sbatch commands, submit nothing), SETUP (shell lines each job runs first: train.sbatch's
# hook, e.g. SETUP='module load cuda/12.4'). `python -m launch.sweep` does the same through submitit,
# and also checks ImageNet weights before submitting.
set -euo pipefail

usage="usage: $0 SWEEP_DIR [sbatch options...] -- [key=value ...]"
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "$usage"
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "$usage (SWEEP_DIR first; --help says more)" >&2
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
PYTHON=${PYTHON:-python3}
SWEEP_FILE=${SWEEP_FILE:-$here/../configs/sweep.yaml}
plan=$(cd "$here/.." && "$PYTHON" -m launch.sweep --config "$SWEEP_FILE" --print-arms)

while IFS=$'\t' read -r -a fields; do
    arm=${fields[0]}
    recipe=${fields[1]}
    arm_overrides=("${fields[@]:2}")
    command=(sbatch --parsable --job-name "$arm" --output "$sweep_dir/$arm/slurm-%j.out" "${sbatch_args[@]}"
        "$here/train.sbatch" --config "$recipe" "${arm_overrides[@]}" "output.dir=$sweep_dir/$arm"
        "wandb.group=$(basename "$sweep_dir")" "$@")
    if [ "${DRY_RUN:-0}" = 1 ]; then
        echo "$arm: ${command[*]}"
        continue
    fi
    mkdir -p "$sweep_dir/$arm"
    echo "$arm: job $("${command[@]}")"
done <<<"$plan"
