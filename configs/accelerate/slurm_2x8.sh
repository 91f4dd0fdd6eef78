#!/bin/bash
# SimMIM pretraining on 2 nodes x 8 GPUs with SLURM: one `accelerate launch` per node (it starts the 8 processes).
#   sbatch configs/accelerate/slurm_2x8.sh configs/pretrain/swin_base_192_w6_100ep.yaml \
#     --train_dir /data/imagenet/train --output_dir /shared/outputs/swin_base_100ep
# Submit from the repository root (paths are relative to it). Every argument goes to run_mim.py (for finetuning:
# SIMMIM_SCRIPT=run_image_classification.py sbatch ...). The node count, each node's rank and the rank-0 address come
# from SLURM; GPUS_PER_NODE must match --gpus-per-node.
#SBATCH --job-name=simmim
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
SCRIPT=${SIMMIM_SCRIPT:-run_mim.py}
# sed reads every line: `head -n 1` would close the pipe early, and pipefail turns scontrol's SIGPIPE into a failure
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
# sbatch runs a copy of this file: find the launch config from the submission folder, not from the script
LAUNCH_CONFIG=${SIMMIM_LAUNCH_CONFIG:-${SLURM_SUBMIT_DIR:-.}/configs/accelerate/multinode_2x8.yaml}

# Single quotes: SLURM_PROCID (the node's rank) is expanded on each node, by the task that srun starts there.
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --config_file "$0" \
    --num_machines "$SLURM_NNODES" --num_processes "$(( SLURM_NNODES * $1 ))" --machine_rank "$SLURM_PROCID" \
    --main_process_ip "$2" --main_process_port "$3" "${@:4}"' \
    "$LAUNCH_CONFIG" "$GPUS_PER_NODE" "$MAIN_PROCESS_IP" "$MAIN_PROCESS_PORT" "$SCRIPT" "$@"
