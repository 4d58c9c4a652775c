#!/usr/bin/env bash
# Create a Cloud TPU VM slice, install bitdance-jax on every worker, and run the same
# training command on all of them with --multihost=yes (every worker calls
# jax.distributed.initialize(), which reads the workers from the TPU VM's metadata).
#
#   launch/tpu_vm.sh create                      # make the slice (once)
#   launch/tpu_vm.sh setup                       # copy this checkout + pip install (once)
#   launch/tpu_vm.sh train configs/imagenet_bitdance.py:B,4 gs://BUCKET/runs/b4x \
#       --config.tokenizer_dir=gs://BUCKET/ae_d16c32 --config.data.source=tfds \
#       --config.data.path=gs://BUCKET/tensorflow_datasets
#   launch/tpu_vm.sh delete
#
# The workdir must be shared by every worker (a gs:// bucket): Orbax writes the checkpoints
# there, and relaunching the same command after a preemption resumes from the last one.
set -euo pipefail

TPU_NAME=${TPU_NAME:-bitdance}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-bitdance-jax}
SPOT_FLAG=${SPOT:+--spot}

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" $SPOT_FLAG
    ;;
  setup)
    repo_root=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$repo_root" --exclude=.venv --exclude=.git --exclude=out -czf /tmp/bitdance-jax.tgz .
    gcloud compute tpus tpu-vm scp /tmp/bitdance-jax.tgz "$TPU_NAME":~/ --zone="$ZONE" \
      $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf ~/bitdance-jax.tgz && \
             cd $REMOTE_DIR && python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tpu]'"
    ;;
  train)
    shift
    config=$1; workdir=$2; shift 2
    ssh_all "cd $REMOTE_DIR && nohup python3 -m bitdance_jax.train --config $config \
             --workdir $workdir --multihost=yes $* > train.log 2>&1 &"
    echo "started on every worker; follow with:"
    echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f $REMOTE_DIR/train.log'"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet
    ;;
  *)
    sed -n '2,17p' "$0"; exit 2
    ;;
esac
