#!/bin/bash
# distrnn across several nodes: one srun task per node, each starting `distrnn train` (accelerate's
# launcher with launch/multinode.yaml) for its node's GPUs; together they form one process group.
#
#   mkdir -p logs && sbatch --nodes=4 slurm/train_multinode.sh --config configs/default.yaml
#   DISTRNN_MODE=cpu sbatch --gres=none --cpus-per-task=2 --nodes=2 slurm/train_multinode.sh --config smoke
#
# The same variables as slurm/train.sh (DISTRNN_MODE, DISTRNN_NUM_PROCESSES per node, DISTRNN_VENV,
# DISTRNN_SETUP, DISTRNN_OUTPUT_DIR on a file system all nodes share, DISTRNN_DATA_DIR, WANDB_MODE),
# and the same preemption path (USR1 90 s before the limit -> checkpoint -> exit 75 -> requeue).
# NCCL: set NCCL_SOCKET_IFNAME / NCCL_IB_HCA in DISTRNN_SETUP if the nodes have several networks.
#SBATCH --job-name=distrnn-multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
# A GPU node's CPUs and GPUs: on a CPU-only node, ask for what it has (sbatch --gres=none --cpus-per-task=2).
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
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
per_node="${DISTRNN_NUM_PROCESSES:-}"  # empty: all GPUs of the node (auto), 1 on CPU
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The address SLURM itself uses for the head node (works where node names do not resolve).
head_addr=$(scontrol show node "$head_node" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
head_addr="${head_addr:-$head_node}"
port=$((20000 + SLURM_JOB_ID % 20000))  # derived from the job id: two jobs on one head node do not clash
echo "head node $head_node ($head_addr), port $port, $SLURM_NNODES nodes"

# Single quotes: SLURM_NODEID is each task's own, expanded inside the task, not by this batch shell.
# --kill-on-bad-exit=0: after a stop request every rank saves the same checkpoint and exits 75, but not at
# the same instant; with =1, srun killed the slower node's task on the first 75 and the step ended
# "Terminated" (3 of 5 preemptions on the test cluster were not requeued). Every task finishing on its
# own is safe: a rank whose peer died stops within train.collective_timeout_s. srun's exit code is then
# the highest of the tasks' (75 when the step stopped to be requeued).
run_step srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c '
    echo "node $(hostname) task $SLURM_PROCID machine rank $SLURM_NODEID"
    exec distrnn train --mode "$0" ${1:+--num-processes "$1"} --num-machines "$SLURM_NNODES" \
        --machine-rank "$SLURM_NODEID" --main-process-ip "$2" --main-process-port "$3" "${@:4}"
' "$mode" "$per_node" "$head_addr" "$port" --output-dir "$DISTRNN_OUTPUT_DIR" "${WANDB_FLAGS[@]}" "$@"
finish
