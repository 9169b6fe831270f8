#!/bin/bash
# Fine-tuning on Slurm: sbatch slurm/finetune.sh CONFIG [dotted.key=value ...]
# Run from the repository root. Edit the #SBATCH lines below for your cluster. accelerate starts the
# ranks: one Slurm task per node runs `accelerate launch`, which starts one process per GPU.
#SBATCH --job-name=finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=80
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail
source "${MIMKIT_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh" || exit 2

mimkit_setup finetune "$@"
# Processes per node: the GPUs Slurm gave each node (PROCS_PER_NODE overrides; 1 on a CPU node).
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus=${gpus##*:}  # "a100:8" -> 8
PROCS_PER_NODE=${PROCS_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
MULTI=()
[ "$gpus" -gt 0 ] && [ $((NNODES * PROCS_PER_NODE)) -gt 1 ] && MULTI=(--multi_gpu)
[ "$gpus" -gt 0 ] || MULTI=(--cpu)
# mimkit.distributed.env gives the node's task NODE_RANK and MASTER_ADDR (first host of the node
# list) and MASTER_PORT (from the job id); accelerate turns them into the ranks of its processes.
# The single quotes are deliberate: the variables expand in each task, after the env module set them.
#
# Preemption. --signal=USR1@120 signals every process of the job step: the trainer processes, which
# save at the next step boundary and exit 75 (finetune/trainer.py), but also the launcher, which has no
# handler for USR1 and would die of it (default action), leaving Slurm to kill its children mid-save.
# So the task ignores USR1 (`trap '' USR1`, inherited across exec by the launcher and its children;
# the trainer installs its own handler first thing). And the requeue does not rest on exit codes:
# accelerate's launcher reports a process's 75 as its own 1 (torch elastic's ChildFailedError, or
# CalledProcessError for a single process), so the trainer's main process writes RUN_DIR/requeue
# once every process has saved (a shared run folder, as the checkpoints need), and this script
# requeues on that file (on a 75 too, should a launcher ever pass it through). A marker left from
# before is removed first, so only this launch's preemption counts.
MARKER=$RUN_DIR/requeue
[ -n "${MIMKIT_DRY_RUN:-}" ] || rm -f "$MARKER"
mimkit_srun --ntasks-per-node=1 -- bash -c 'trap "" USR1; exec "$0" -m accelerate.commands.launch \
  --num_machines "$1" --num_processes "$(( $1 * $2 ))" --machine_rank "$NODE_RANK" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" "${@:3}"' \
  "$PYTHON" "$NNODES" "$PROCS_PER_NODE" "${MULTI[@]}" finetune --config "$CONFIG" "${OVERRIDES[@]}"
rc=$?
if [ -f "$MARKER" ]; then
  echo "[mimkit-slurm] $MARKER: $(cat "$MARKER") (launcher exit code $rc)"
  rm -f "$MARKER"
  rc=$MIMKIT_REQUEUE_EXIT_CODE
fi
mimkit_finish $rc
