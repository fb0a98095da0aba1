#!/bin/bash
# A grid of distrnn runs as a SLURM job array: task i trains with the KEY=VALUE overrides on line i+1 of a
# grid file, in its own run folder, with slurm/train.sh's preemption and requeue behaviour per task.
#
#   mkdir -p logs
#   sbatch --array=0-5 slurm/sweep_array.sh sweeps/grid.txt --config fast --set data.val_samples=5000
#   sbatch --array=0-5%2 ...                                  # at most 2 tasks at once
#   distrnn report runs/distrnn-sweep-<array id>/*           # the trials, best validation accuracy first
#   DISTRNN_MODE=cpu sbatch --gres=none --cpus-per-task=2 --array=0-2 slurm/sweep_array.sh GRID --config smoke
#
# The first argument is the grid file (relative to the submit folder): one line per task, KEY=VALUE pairs
# separated by spaces (values without spaces), e.g. `optim.lr=0.003 train.batch_size=512`; --array=0-(N-1)
# for N lines. The other arguments go to `distrnn train` for every task; the line's pairs come after them
# (positional overrides) and so win. The grid is read when a task starts, and again if it is requeued:
# leave it unchanged until the array has finished (a resumed task whose line changed a key that must
# match its checkpoint is refused).
#
# Run folders: ${DISTRNN_SWEEP_DIR:-runs/<job name>-<array id>}/<task id>. A requeued task keeps its array
# id and task id, so it resumes in its own folder; DISTRNN_OUTPUT_DIR is ignored here (every task would
# share it). Passing --output-dir or a train.output_dir pair would do the same, and is refused.
# Everything else is as in slurm/train.sh (DISTRNN_MODE, DISTRNN_NUM_PROCESSES, DISTRNN_VENV, DISTRNN_SETUP,
# DISTRNN_MAX_REQUEUES, DISTRNN_DATA_DIR, WANDB_MODE); each task is its own W&B run,
# <job name>-<array id>_<task id>.
#SBATCH --job-name=distrnn-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
# A GPU node's CPUs and GPUs, per task: on a CPU-only node, ask for what it has (sbatch --gres=none --cpus-per-task=2).
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@90
##SBATCH --partition=gpu
##SBATCH --account=myproject

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

# Exit 2, as distrnn does for a bad command line or config: a wrong grid is not retried by a requeue.
refuse() { echo "distrnn sweep: error: $*" >&2; exit 2; }

[ -n "${SLURM_ARRAY_TASK_ID:-}" ] || refuse "not a job array task; submit with sbatch --array=0-(N-1) for a grid of N lines"
[ $# -ge 1 ] || refuse "no grid file; pass it first: sbatch --array=0-(N-1) slurm/sweep_array.sh GRID [distrnn train options]"
grid="$1"
shift
[ -f "$grid" ] && [ -r "$grid" ] || refuse "grid file $grid is not a readable file (relative paths start at $PWD)"
lines=$(awk 'END { print NR }' "$grid")  # counts a last line without a newline too, unlike wc -l
[ "$lines" -gt 0 ] || refuse "grid file $grid is empty"
[ "$SLURM_ARRAY_TASK_ID" -lt "$lines" ] ||
    refuse "task $SLURM_ARRAY_TASK_ID has no line in $grid ($lines lines): submit with --array=0-$((lines - 1))"
line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$grid" | tr -d '\r')
read -r -a pairs <<< "$line"  # split on blanks; no glob expansion, no quotes
[ ${#pairs[@]} -gt 0 ] || refuse "line $((SLURM_ARRAY_TASK_ID + 1)) of $grid (task $SLURM_ARRAY_TASK_ID) is empty"
for arg in "${pairs[@]}" "$@"; do
    case "$arg" in
        --output-dir | --output-dir=* | train.output_dir=*) refuse "$arg: each task's run folder is set by this script";;
    esac
done

# Set before common.sh, which keeps a DISTRNN_OUTPUT_DIR it finds: a stale one exported by the user would
# put every task in one folder.
export DISTRNN_OUTPUT_DIR="${DISTRNN_SWEEP_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_ARRAY_JOB_ID}}/${SLURM_ARRAY_TASK_ID}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
echo "grid ${grid}, line $((SLURM_ARRAY_TASK_ID + 1)) of ${lines}: ${pairs[*]}"

mode="${DISTRNN_MODE:-auto}"
processes=()
[ -n "${DISTRNN_NUM_PROCESSES:-}" ] && processes=(--num-processes "$DISTRNN_NUM_PROCESSES")

run_step srun --ntasks=1 distrnn train --mode "$mode" "${processes[@]}" \
    --output-dir "$DISTRNN_OUTPUT_DIR" "${WANDB_FLAGS[@]}" "$@" "${pairs[@]}"
finish
