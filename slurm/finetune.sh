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
mimkit_srun --ntasks-per-node=1 -- bash -c 'exec "$0" -m accelerate.commands.launch \
  --num_machines "$1" --num_processes "$(( $1 * $2 ))" --machine_rank "$NODE_RANK" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" "${@:3}"' \
  "$PYTHON" "$NNODES" "$PROCS_PER_NODE" "${MULTI[@]}" finetune --config "$CONFIG" "${OVERRIDES[@]}"
mimkit_finish $?
