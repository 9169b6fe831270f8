#!/usr/bin/env bash
# A single-node Slurm on this machine, for the tests and for trying the sbatch scripts by hand.
#
#   bash scripts/slurm_cluster.sh start    # write slurm.conf, start munged, slurmctld, slurmd; wait for idle
#   bash scripts/slurm_cluster.sh status   # exit 0 when the daemons this script started are up
#   bash scripts/slurm_cluster.sh stop     # cancel the jobs, stop the daemons by the PIDs recorded at start
#
# Runs as root without systemd (Debian packages: slurmctld slurmd slurm-client munge). Daemons run in
# the foreground (-D / -F) in the background of this script, so `$!` is their PID: `stop` ends exactly
# the processes `start` started, never a process found by name. Everything else (state, spool, logs,
# PIDs) lives in $MIMKIT_SLURM_DIR. `start` is idempotent: a running cluster is left as it is.
#
# Timings tuned for tests (a real cluster keeps Slurm's defaults):
#   AuthInfo=cred_expire=10   a requeued job waits cred_expire seconds before it may start again
#                             (default 120: the "requeue takes 2 minutes" of a default install)
#   SchedulerParameters=sched_interval=2,bf_interval=1
#                             the scheduler otherwise looks at a job that became eligible (requeue
#                             delay over) only every 60 s (main loop) / 30 s (backfill)
#   KillWait=5                SIGTERM -> SIGKILL grace when a job ends or is requeued (default 30)
#   MinJobAge=600             finished jobs stay visible to `scontrol show job` (no accounting here)
set -euo pipefail

STATE=${MIMKIT_SLURM_DIR:-/var/tmp/mimkit-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
PIDS=$STATE/pids
MARKER="# written by mimkit scripts/slurm_cluster.sh"
HOST=$(hostname -s)
CPUS=$(nproc)
[ "$CPUS" -ge 2 ] || CPUS=2  # the tests start 2 ranks; config_overrides lets a 1-core runner claim 2
TIMEOUT=${MIMKIT_SLURM_START_TIMEOUT:-60}

log() { echo "[slurm_cluster] $*" >&2; }

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

recorded_pid() {  # recorded_pid NAME -> the PID this script started for NAME, if any
  [ -f "$PIDS" ] || return 0
  awk -v n="$1" '$1 == n { print $2 }' "$PIDS" | tail -n 1
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    log "refusing to overwrite $CONF: it was not written by this script (set SLURM_CONF to another path)"
    exit 1
  fi
  mkdir -p "$(dirname "$CONF")" "$STATE/ctld" "$STATE/spool" "$STATE/log"
  cat > "$CONF.tmp" <<EOF
$MARKER
ClusterName=mimkit
SlurmctldHost=$HOST
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then return; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  [ -f /etc/munge/munge.key ] || { log "no /etc/munge/munge.key (is the munge package installed?)"; exit 1; }
  munged -F --force >"$STATE/log/munged.log" 2>&1 &
  echo "munged $!" >> "$PIDS"
  for _ in $(seq 50); do munge_works && return; sleep 0.1; done
  log "munged did not come up; see $STATE/log/munged.log"; exit 1
}

node_state() { sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n 1; }

cmd_status() {
  local ctld slurmd
  ctld=$(recorded_pid slurmctld); slurmd=$(recorded_pid slurmd)
  if alive "$ctld" && alive "$slurmd"; then
    echo "running: slurmctld $ctld, slurmd $slurmd, node $HOST $(node_state); conf $CONF; logs $STATE/log"
    return 0
  fi
  echo "not running (state in $STATE)"
  return 1
}

cmd_start() {
  mkdir -p "$STATE/log"
  if cmd_status >/dev/null; then
    log "already running"; cmd_status; return 0
  fi
  command -v slurmctld >/dev/null || { log "slurmctld not installed: bash scripts/setup.sh"; exit 1; }
  # Half a cluster from an earlier start (a daemon died): end what is left of it, start afresh.
  [ -f "$PIDS" ] && cmd_stop
  : > "$PIDS"
  write_conf
  start_munge
  # -i: ignore saved state, so a new cluster never inherits jobs from one killed earlier.
  slurmctld -D -i -f "$CONF" >>"$STATE/log/slurmctld.out" 2>&1 &
  echo "slurmctld $!" >> "$PIDS"
  for _ in $(seq $((TIMEOUT * 10))); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
  slurmd -D -f "$CONF" >>"$STATE/log/slurmd.out" 2>&1 &
  echo "slurmd $!" >> "$PIDS"
  local state="" deadline=$((SECONDS + TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    state=$(node_state)
    case "$state" in
      idle|mix|alloc) log "node $HOST is $state"; cmd_status; return 0 ;;
      down*|drain*|drng*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  log "node $HOST not idle after ${TIMEOUT}s (state '$state'); logs in $STATE/log"
  tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  cmd_stop
  exit 1
}

stop_pids() {  # stop_pids NAME...: TERM them all (slurmd takes seconds), then KILL what is left after 10 s
  local name pid termed=()
  for name in "$@"; do
    pid=$(recorded_pid "$name")
    if alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; termed+=("$name"); fi
  done
  for name in "${termed[@]}"; do
    pid=$(recorded_pid "$name")
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; log "killed $name ($pid)"
    else log "stopped $name ($pid)"; fi
  done
}

cmd_stop() {
  [ -f "$PIDS" ] || { log "nothing recorded in $PIDS"; return 0; }
  if alive "$(recorded_pid slurmctld)"; then
    # Jobs first: slurmd's job steps (slurmstepd) outlive slurmd, so cancel and wait for them.
    scancel --full $(squeue -h -o %i 2>/dev/null) >/dev/null 2>&1 || true
    for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
  fi
  stop_pids slurmd slurmctld
  stop_pids munged
  rm -f "$PIDS"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
