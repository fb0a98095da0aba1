#!/bin/bash
# distrnn on one node: DDP over the node's GPUs, one GPU, or CPU processes with gloo.
#
#   mkdir -p logs && sbatch slurm/train.sh                          # default config, all GPUs of the node
#   sbatch slurm/train.sh --config configs/smoke.yaml               # arguments go to `distrnn train`
#   DISTRNN_MODE=cpu sbatch --gres=none --cpus-per-task=2 slurm/train.sh --config smoke   # a CPU-only node
#
# Adapt the #SBATCH lines (partition, account, GPUs, CPUs, time) and these variables:
#   DISTRNN_MODE           auto|cpu|gpu|ddp, as `distrnn train --mode` (default auto)
#   DISTRNN_NUM_PROCESSES  processes on the node (default: all GPUs; 1 on CPU)
#   DISTRNN_VENV           virtual environment to activate (default .venv of the submit folder)
#   DISTRNN_SETUP          shell commands run first, e.g. "module load cuda/12.4" (default none)
#   DISTRNN_OUTPUT_DIR     run folder (default runs/<job name>-<job id>, or -<array id>_<task> in an
#                          array: a requeued job resumes there)
#   DISTRNN_MAX_REQUEUES   stop requeueing after this many restarts (default 20)
#   DISTRNN_DATA_DIR       folder holding MNIST/raw
#   WANDB_MODE             default offline (compute nodes often have no internet); `wandb sync` later
#
# Preemption and time limit: 90 s before the limit SLURM sends USR1 to this script, which passes it to
# distrnn; every rank finishes its step, saves a checkpoint and exits with 75; the script then requeues
# the job, which resumes from that checkpoint. `scancel --signal=USR1 --batch JOBID` does the same now.
#SBATCH --job-name=distrnn
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
# A GPU node's CPUs and GPUs: on a CPU-only node, ask for what it has (sbatch --gres=none --cpus-per-task=2).
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@90
##SBATCH --partition=gpu
##SBATCH --account=myproject

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# shellcheck source=slurm/common.sh
source slurm/common.sh

mode="${DISTRNN_MODE:-auto}"
processes=()
[ -n "${DISTRNN_NUM_PROCESSES:-}" ] && processes=(--num-processes "$DISTRNN_NUM_PROCESSES")

run_step srun --ntasks=1 distrnn train --mode "$mode" "${processes[@]}" \
    --output-dir "$DISTRNN_OUTPUT_DIR" "${WANDB_FLAGS[@]}" "$@"
finish
