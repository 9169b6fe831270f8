#!/bin/bash
# Tokenizer training on Slurm: sbatch slurm/tokenizers.sh CONFIG [dotted.key=value ...]
# Run from the repository root. Edit the #SBATCH lines below for your cluster (or override them on the
# command line: sbatch --nodes 4 slurm/pretrain.sh ...). One rank per GPU: ntasks-per-node = GPUs.
#SBATCH --job-name=tokenizers
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
# --signal=USR1@120: every rank gets SIGUSR1 two minutes before the time limit; the trainer saves at
# the next step boundary and exits 75, and this script requeues the job, which resumes from that save.
set -uo pipefail
source "${MIMKIT_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh" || exit 2

mimkit_setup tokenizers "$@"
mimkit_srun -- "$PYTHON" tokenizers --config "$CONFIG" "${OVERRIDES[@]}"
mimkit_finish $?
