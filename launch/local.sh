#!/usr/bin/env bash
# N processes of one training job on this machine, joined by jax.distributed.
#
#   launch/local.sh NUM_PROCESSES --config=configs/mae_vit.py:local --workdir=DIR [--config.KEY=V ...]
#
# Each process gets --coordinator_address=127.0.0.1:PORT --num_processes=N
# --process_id=I (ssl_jax/main.py calls jax.distributed.initialize with them);
# process 0 hosts the coordinator. The output of process I goes to
# LOG_DIR/process_I.log (process 0's is also shown here) and the process ids to
# LOG_DIR/pids. When one process fails the others are stopped (they would
# otherwise wait in a collective until jax's heartbeat timeout). SIGTERM to
# this script is passed on to every process, and Ctrl-C reaches them from the
# terminal: they save a checkpoint of one common step and exit.
#
# Environment:
#   PORT              coordinator port (default: one the kernel says is free now)
#   LOG_DIR           where the logs go (default: logs/local-<UTC time>)
#   GPUS_PER_PROCESS  give process I the GPUs I*G .. I*G+G-1 (CUDA_VISIBLE_DEVICES)
#   PYTHON            the interpreter (default: python)
# CPU only, several devices per process: XLA_FLAGS=--xla_force_host_platform_device_count=4.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES --config=... --workdir=... [flags of ssl_jax.main]" >&2
  exit 2
fi
num_processes="$1"
shift
python="${PYTHON:-python}"
port="${PORT:-$("${python}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
log_dir="${LOG_DIR:-logs/local-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "${log_dir}"

pids=()
stop_all() {  # stop_all SIGNAL: sends SIGNAL to every process still running.
  local pid
  for pid in "${pids[@]}"; do
    kill -s "$1" "${pid}" 2>/dev/null || true
  done
}
trap 'stop_all TERM' TERM
# Ctrl-C in a terminal reaches every process of the foreground group already;
# passing it on too would be a second SIGINT, which makes the trainer exit at
# once instead of saving. The launcher itself keeps waiting.
trap ':' INT

for ((i = 0; i < num_processes; i++)); do
  if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
    first=$((i * GPUS_PER_PROCESS))
    CUDA_VISIBLE_DEVICES="$(seq -s, "${first}" "$((first + GPUS_PER_PROCESS - 1))")"
    export CUDA_VISIBLE_DEVICES
  fi
  : >"${log_dir}/process_${i}.log"  # Exists before `tail` below opens it.
  "${python}" -m ssl_jax.main "$@" --coordinator_address="127.0.0.1:${port}" \
    --num_processes="${num_processes}" --process_id="${i}" >"${log_dir}/process_${i}.log" 2>&1 &
  pids+=("$!")
done
echo "${pids[*]}" >"${log_dir}/pids"
echo "launch/local.sh: ${num_processes} processes (pids ${pids[*]}), coordinator 127.0.0.1:${port}," \
  "logs in ${log_dir}" >&2
tail -n +1 -f --pid="${pids[0]}" "${log_dir}/process_0.log" &
tail_pid=$!

# Wait for every process; the first failure stops the rest.
declare -A running=()  # pid -> process id
for ((i = 0; i < num_processes; i++)); do
  running[${pids[i]}]=${i}
done
status=0
killer_pid=''
while ((${#running[@]} > 0)); do
  finished=''
  code=0
  wait -n -p finished "${!running[@]}" || code=$?
  if [[ -z "${finished}" ]]; then
    continue  # A trapped signal interrupted the wait; the processes got it too.
  fi
  i=${running[${finished}]}
  unset "running[${finished}]"
  if ((code != 0 && status == 0)); then
    status=${code}
    echo "launch/local.sh: process ${i} exited with ${code}; stopping the others." \
      "Its log: ${log_dir}/process_${i}.log" >&2
    stop_all TERM
    # Those stuck in a collective with the dead process do not get to act on SIGTERM.
    (sleep 30 && stop_all KILL) &
    killer_pid=$!
  fi
done
if [[ -n "${killer_pid}" ]]; then
  kill "${killer_pid}" 2>/dev/null || true
fi
wait "${tail_pid}" 2>/dev/null || true
exit "${status}"
