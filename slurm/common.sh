# Shared by slurm/train.sh and slurm/train_multinode.sh (sourced, not run).
# Sets up the environment, runs the training step with signal forwarding, and requeues on exit 75.

REQUEUE_EXIT_CODE=75
# A job that fails the same way after every requeue would otherwise loop forever.
MAX_REQUEUES="${DISTRNN_MAX_REQUEUES:-20}"

# In a job array, this task alone: `scontrol requeue $SLURM_JOB_ID` would requeue the whole array
# for the task whose job id is the array's own, and every task needs its own run folder.
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    JOB="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
    JOB="${SLURM_JOB_ID}"
fi

# Slurm 22.05 and 23.02 do not pass the job's --cpus-per-task on to srun inside a batch script, which
# then binds all of a step's workers to one CPU; later versions read this variable too.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"

[ -n "${DISTRNN_SETUP:-}" ] && eval "$DISTRNN_SETUP"
# shellcheck disable=SC1091
[ -f "${DISTRNN_VENV:-.venv}/bin/activate" ] && source "${DISTRNN_VENV:-.venv}/bin/activate"
export WANDB_MODE="${WANDB_MODE:-offline}"
export DISTRNN_OUTPUT_DIR="${DISTRNN_OUTPUT_DIR:-runs/${SLURM_JOB_NAME}-${JOB}}"
WANDB_FLAGS=(--set "wandb.run_name=${SLURM_JOB_NAME}-${JOB}" --set "wandb.tags=slurm,job-${JOB}")

echo "distrnn job ${JOB} on ${SLURM_JOB_NODELIST}: restart count ${SLURM_RESTART_COUNT:-0}," \
     "run folder ${DISTRNN_OUTPUT_DIR}, W&B ${WANDB_MODE}, ${SLURM_CPUS_PER_TASK:-1} CPU(s) per task"

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
        if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
            echo "distrnn: job ${JOB} was requeued ${SLURM_RESTART_COUNT:-0} times (DISTRNN_MAX_REQUEUES=${MAX_REQUEUES});" \
                 "not again: its checkpoint resumes with DISTRNN_OUTPUT_DIR=${DISTRNN_OUTPUT_DIR} sbatch ..."
            exit "$status"
        fi
        echo "distrnn stopped after a checkpoint (exit $REQUEUE_EXIT_CODE): requeueing job ${JOB}"
        scontrol requeue "$JOB"
        exit 0
    fi
    if [ "$WANDB_MODE" = offline ] && compgen -G "${DISTRNN_OUTPUT_DIR}/wandb/offline-run-*" >/dev/null; then
        echo "W&B ran offline; upload with: wandb sync ${DISTRNN_OUTPUT_DIR}/wandb/offline-run-*"
    fi
    exit "$status"
}
