# Shared by slurm/train.sh and slurm/train_multinode.sh (sourced, not run).
# Sets up the environment, runs the training step with signal forwarding, and requeues on exit 75.

REQUEUE_EXIT_CODE=75

[ -n "${DISTRNN_SETUP:-}" ] && eval "$DISTRNN_SETUP"
# shellcheck disable=SC1091
[ -f "${DISTRNN_VENV:-.venv}/bin/activate" ] && source "${DISTRNN_VENV:-.venv}/bin/activate"
export WANDB_MODE="${WANDB_MODE:-offline}"
export DISTRNN_OUTPUT_DIR="${DISTRNN_OUTPUT_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
WANDB_FLAGS=(--set "wandb.run_name=${SLURM_JOB_NAME}-${SLURM_JOB_ID}" --set "wandb.tags=slurm,job-${SLURM_JOB_ID}")

echo "distrnn job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}: restart count ${SLURM_RESTART_COUNT:-0}," \
     "run folder ${DISTRNN_OUTPUT_DIR}, W&B ${WANDB_MODE}"

# bash runs a trap only once the foreground command ends, so the step runs in the background and the
# script waits for it; USR1 (SLURM's warning before the time limit, or scancel --signal=USR1 --batch)
# and TERM are passed on to srun, which forwards them to the training processes.
step_pid=""
forward() { [ -n "$step_pid" ] && kill "-$1" "$step_pid" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM

run_step() {
    "$@" &
    step_pid=$!
    while true; do
        wait "$step_pid"
        status=$?
        kill -0 "$step_pid" 2>/dev/null || break  # wait returned for a trapped signal: keep waiting
    done
}

finish() {
    if [ "$status" -eq "$REQUEUE_EXIT_CODE" ]; then
        echo "distrnn stopped after a checkpoint (exit $REQUEUE_EXIT_CODE): requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    if [ "$WANDB_MODE" = offline ] && compgen -G "${DISTRNN_OUTPUT_DIR}/wandb/offline-run-*" >/dev/null; then
        echo "W&B ran offline; upload with: wandb sync ${DISTRNN_OUTPUT_DIR}/wandb/offline-run-*"
    fi
    exit "$status"
}
