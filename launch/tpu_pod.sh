#!/usr/bin/env bash
# One training job on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh setup  TPU_NAME ZONE                      # once per slice
#   launch/tpu_pod.sh train  TPU_NAME ZONE --config=configs/mae_vit.py --workdir=gs://BUCKET/mae [...]
#   launch/tpu_pod.sh stop   TPU_NAME ZONE                      # SIGTERM: save and exit
#
# `gcloud compute tpus tpu-vm ssh --worker=all` runs the same command on every
# host. `setup` clones the repo and creates a venv on each (REPO_URL,
# REPO_REF, REMOTE_DIR; jax[tpu] instead of the CPU jax of requirements.txt).
# `train` starts `python -m ssl_jax.main --distributed ...` on each host in the
# background (nohup, so a dropped ssh session does not kill it) with its output
# in REMOTE_DIR/train.log (its pid in REMOTE_DIR/train.pid, which `stop` signals). With --distributed, jax.distributed.initialize()
# reads the slice from the TPU VM metadata server: its process index from
# `agent-worker-number`, the coordinator from the first of
# `worker-network-endpoints` (jax/_src/clusters/cloud_tpu_cluster.py:98-111,
# 189-206). Every host must run the same command; --workdir must be a path
# every host sees (gs://...): each host writes its own checkpoint shards there.
#
# Environment: REPO_URL (default: this checkout's origin), REPO_REF (default:
# this checkout's commit), REMOTE_DIR (default: ssl_jax), PROJECT (gcloud
# --project, optional).
set -euo pipefail

usage() {
  echo "usage: $0 setup|train|stop TPU_NAME ZONE [flags of ssl_jax.main]" >&2
  exit 2
}
[[ $# -ge 3 ]] || usage
action="$1"
tpu_name="$2"
zone="$3"
shift 3
remote_dir="${REMOTE_DIR:-ssl_jax}"
project_flag=()
if [[ -n "${PROJECT:-}" ]]; then
  project_flag=(--project="${PROJECT}")
fi

on_all_workers() {  # on_all_workers COMMAND: runs COMMAND (one string) on every host.
  gcloud compute tpus tpu-vm ssh "${tpu_name}" --zone="${zone}" "${project_flag[@]}" \
    --worker=all --command="$1"
}

case "${action}" in
  setup)
    repo_url="${REPO_URL:-$(git config --get remote.origin.url)}"
    repo_ref="${REPO_REF:-$(git rev-parse HEAD)}"
    jax_version="$(sed -n 's/^jax==//p' requirements.txt)"  # The pinned jax, with libtpu.
    # printf %q quotes each value for the remote shell.
    on_all_workers "set -euo pipefail
      dir=$(printf %q "${remote_dir}")
      if [[ ! -d \"\${dir}\" ]]; then git clone $(printf %q "${repo_url}") \"\${dir}\"; fi
      cd \"\${dir}\" && git fetch --quiet origin && git checkout --quiet $(printf %q "${repo_ref}")
      python3 -m venv .venv && . .venv/bin/activate
      pip install --quiet -r requirements.txt
      pip install --quiet $(printf %q "jax[tpu]==${jax_version}") \
        -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
      python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
    ;;
  train)
    [[ $# -ge 1 ]] || usage
    args=""
    for arg in "$@"; do
      args+=" $(printf %q "${arg}")"
    done
    on_all_workers "set -euo pipefail
      cd $(printf %q "${remote_dir}") && . .venv/bin/activate
      nohup python -m ssl_jax.main --distributed${args} > train.log 2>&1 &
      echo \$! > train.pid
      echo \"\$(hostname): started pid \$!, log ${remote_dir}/train.log\""
    ;;
  stop)
    # jax's preemption notifier takes SIGTERM: every host saves the agreed step and exits.
    on_all_workers "kill -TERM \"\$(cat $(printf %q "${remote_dir}")/train.pid)\" || true"
    ;;
  *)
    usage
    ;;
esac
