# Shared by slurm/pretrain.sh, slurm/tokenizers.sh and slurm/finetune.sh (sourced, not run).
#
# What every stage script does inside its allocation:
#   1. the run folder: runs/NAME with NAME from the job (JOBNAME-JOBID), or run.name=... if given;
#      a requeued job keeps its id, so it finds its own folder and resumes from checkpoints/latest;
#   2. logs per job in runs/NAME/logs/: JOBID.out (this script), JOBID-rankN.out (each rank);
#   3. one srun starting the ranks; each rank gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (first
#      host of the node list) and MASTER_PORT (from the job id) from mimkit.distributed.env;
#   4. exit code 75 from the ranks (mimkit.distributed.preempt.REQUEUE_EXIT_CODE: they saved after
#      the warning signal) -> scontrol requeue; the job restarts with the same id and resumes.
#
# Knobs (environment, exported before sbatch or set in the script): MIMKIT_ROOT (repository,
# default: where sbatch was run), PYTHON, RUN_ROOT (default runs), MIMKIT_MAX_REQUEUES (default 100),
# MIMKIT_DRY_RUN=1 (print the srun command instead of running it).

MIMKIT_REQUEUE_EXIT_CODE=75

mimkit_die() { echo "[mimkit-slurm] error: $*" >&2; exit 2; }

# mimkit_setup STAGE CONFIG [overrides...]: sets CONFIG, OVERRIDES (array), RUN_NAME, RUN_DIR, LOG_DIR, PYTHON
mimkit_setup() {
  STAGE=$1; shift
  [ $# -ge 1 ] || mimkit_die "usage: sbatch slurm/$STAGE.sh CONFIG [dotted.key=value ...]"
  [ -n "${SLURM_JOB_ID:-}" ] || [ -n "${MIMKIT_DRY_RUN:-}" ] || mimkit_die "run me with sbatch (or MIMKIT_DRY_RUN=1)"
  MIMKIT_ROOT=${MIMKIT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  cd "$MIMKIT_ROOT"
  CONFIG=$1; shift
  [ -f "$CONFIG" ] || mimkit_die "config file not found: $CONFIG (relative to $MIMKIT_ROOT)"
  if [ -z "${PYTHON:-}" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then PYTHON=$VIRTUAL_ENV/bin/python
    elif [ -x "$MIMKIT_ROOT/.venv/bin/python" ]; then PYTHON=$MIMKIT_ROOT/.venv/bin/python
    else PYTHON=python3; fi
  fi
  # The run name: an explicit run.name=... wins; else the job's name and id (array jobs: id_task).
  local job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
  job=${job:-${SLURM_JOB_ID:-dryrun}}
  RUN_NAME=${SLURM_JOB_NAME:-$STAGE}-$job
  RUN_ROOT=${RUN_ROOT:-runs}
  OVERRIDES=()
  local arg
  for arg in "$@"; do
    case "$arg" in
      run.name=*) RUN_NAME=${arg#run.name=} ;;
      run.root=*) RUN_ROOT=${arg#run.root=} ;;
      *) OVERRIDES+=("$arg") ;;
    esac
  done
  OVERRIDES=("run.root=$RUN_ROOT" "run.name=$RUN_NAME" "${OVERRIDES[@]}")
  RUN_DIR=$RUN_ROOT/$RUN_NAME
  LOG_DIR=$RUN_DIR/logs
  [ -n "${MIMKIT_DRY_RUN:-}" ] && return 0
  mkdir -p "$LOG_DIR"
  echo "[mimkit-slurm] job $job: logs in $MIMKIT_ROOT/$LOG_DIR"  # the last line in Slurm's own output file
  exec >>"$LOG_DIR/$job.out" 2>&1
  echo "=== $(date -Is) job $job restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}: $STAGE $CONFIG ${OVERRIDES[*]}"
}

# mimkit_srun [srun options] -- CMD...: one srun for all ranks, each rank's output in its own file.
mimkit_srun() {
  local opts=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
  shift
  # --kill-on-bad-exit=0 (also where a cluster sets KillOnBadExit=1): after a preemption save the
  # ranks exit 75 one after another; with kill-on-bad-exit the first exit makes Slurm SIGTERM the
  # others while Python is shutting down (handlers reset), srun reports 143, and the job would not
  # requeue. --wait=30 instead: 30 s after the first task exits, srun kills the tasks still running.
  # Ranks that saved for preemption (or finished) exit together, well inside 30 s; the peers of a
  # crashed rank are ended, not left waiting in a collective (NCCL notices a dead peer only at the
  # engine's collective timeout). A crashed rank's DataLoader workers die with it (PR_SET_PDEATHSIG).
  # The task count of this start, from the job's live record: a requeued job may come back on another
  # number of nodes (sbatch --nodes=MIN-MAX) or tasks (scontrol update JobId=... NumTasks=...), while
  # SLURM_NTASKS in the batch environment keeps the first start's count. The run resumes on the new
  # world size from the same checkpoint (converted once to DeepSpeed's universal form).
  local ntasks
  ntasks=$(scontrol show job -o "${SLURM_JOB_ID:-none}" 2>/dev/null | grep -o 'NumTasks=[0-9]*' | cut -d= -f2)
  [ -n "$ntasks" ] && opts=(--ntasks="$ntasks" "${opts[@]}")
  local cmd=(srun --kill-on-bad-exit=0 --wait=30 --open-mode=append --output "$LOG_DIR/%j-rank%t.out" "${opts[@]}"
             "$PYTHON" -m mimkit.distributed.env "$@")
  if [ -n "${MIMKIT_DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"; echo
    return 0
  fi
  echo "[mimkit-slurm] $(printf '%q ' "${cmd[@]}")"
  "${cmd[@]}"
}

# mimkit_finish RC: requeue when the ranks saved for preemption, else end with their exit code.
mimkit_finish() {
  local rc=$1
  if [ "$rc" -eq "$MIMKIT_REQUEUE_EXIT_CODE" ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "${MIMKIT_MAX_REQUEUES:-100}" ]; then
      echo "[mimkit-slurm] preempted, but requeued ${SLURM_RESTART_COUNT} times already: giving up"
      exit "$rc"
    fi
    echo "=== $(date -Is) ranks saved after a preemption signal: scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    # Slurm now ends this script (SIGTERM); wait for that instead of reporting an exit of our own.
    sleep 300 &
    wait $! || true
    exit 0
  fi
  echo "=== $(date -Is) ranks exited with $rc"
  exit "$rc"
}
