#!/bin/bash
# One trial of a W&B sweep (sweeps/fast.yaml): `wandb agent` runs
#   bash sweeps/trial.sh --config fast --set data.val_samples=5000 optim.lr=0.0031 train.batch_size=512 ...
# from its own working directory (run the agent from the repository root). Arguments go to `distrnn train`.
#
# W&B's command macros (${env}, ${interpreter}, ${program}, ${args}, ${args_no_hyphens}, ...) include no run
# id, and ${envvar:WANDB_RUN_ID} is expanded before the agent sets the new trial's id. The agent does export
# WANDB_SWEEP_ID and WANDB_RUN_ID to each trial (wandb.init in the trial reads them itself, so the trial's
# W&B run is the sweep's run); this wrapper turns them into the trial's own run folder:
#   ${DISTRNN_SWEEPS_DIR:-runs/sweeps}/<sweep id>/<run id>
# and a trial the agent starts again with the same run id resumes from that folder's checkpoint.
set -uo pipefail

if [ -z "${WANDB_SWEEP_ID:-}" ] || [ -z "${WANDB_RUN_ID:-}" ]; then
    echo "sweeps/trial.sh: error: WANDB_SWEEP_ID and WANDB_RUN_ID are unset; \`wandb agent SWEEP\` runs this" \
         "script and sets them (to train once, run distrnn train)" >&2
    exit 2
fi
# An agent started outside the virtual environment still finds distrnn.
if ! command -v distrnn >/dev/null && [ -f "${DISTRNN_VENV:-.venv}/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "${DISTRNN_VENV:-.venv}/bin/activate"
fi

# exec: the agent stops a trial (sweep stopped, early termination) with SIGTERM to the process it started;
# distrnn itself then saves a checkpoint and exits 75 instead of a shell dying around it.
exec distrnn train --output-dir "${DISTRNN_SWEEPS_DIR:-runs/sweeps}/${WANDB_SWEEP_ID}/${WANDB_RUN_ID}" "$@"
