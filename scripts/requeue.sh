# Sourced by the sbatch scripts (bash). `run_requeueable CMD...` runs the job step CMD and, when SLURM
# signals this batch script that the time limit is near (#SBATCH --signal=B:USR1@SECONDS), passes
# SIGUSR1 on to the step: main.py ends its current step on every rank, saves last.pt with its place
# in the epoch and exits with 75 (utils/stop.py). If the step then ended unfinished (exit status not
# 0), the job goes back in the queue, and its next start continues with --resume auto.
# Returns the step's exit status.
run_requeueable() {
  local step_pid status=0 asked_to_stop=0
  trap 'asked_to_stop=1; kill -USR1 "${step_pid}" 2>/dev/null || true' USR1
  "$@" &
  step_pid=$!
  wait "${step_pid}" || status=$?
  # A trapped signal ends `wait` early (status > 128); wait again for the step's own exit status.
  while [ "${status}" -gt 128 ] && kill -0 "${step_pid}" 2>/dev/null; do
    status=0
    wait "${step_pid}" || status=$?
  done
  trap - USR1
  if [ "${asked_to_stop}" = 1 ] && [ "${status}" != 0 ]; then
    echo "time limit near: step stopped with status ${status}; requeueing job ${SLURM_JOB_ID}" >&2
    scontrol requeue "${SLURM_JOB_ID}"
  fi
  return "${status}"
}
