#!/bin/bash
# A real single-machine SLURM cluster for trying the batch script and for the `slurm` tests.
#
#   sudo scripts/slurm/local_cluster.sh up       # install (Debian slurm-wlm + munge) if missing, configure, start
#   scripts/slurm/local_cluster.sh status        # sinfo + the queue
#   sudo scripts/slurm/local_cluster.sh down     # cancel jobs, stop every daemon (nothing left running)
#
# Two slurmd nodes, n1 and n2, both on 127.0.0.1 (Debian's build allows several slurmd per host), each
# advertising this machine's cores, in one partition `local`: enough for a 2-node job. No cgroups, no
# accounting (query finished jobs with `scontrol show job ID` for MinJobAge=300 s), no systemd needed.
# A requeued job restarts after ~12 s (short credential expiry and scheduler interval).
# `up` is idempotent: running daemons are kept unless the generated config changed.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
NODES=(n1 n2)
PORTS=(17001 17002)

need_root() { [ "$(id -u)" = 0 ] || { echo "local_cluster.sh $1: run as root (sudo)" >&2; exit 1; }; }

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  echo "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; }
}

write_config() {  # prints the config for this machine on stdout
  local hw cpus mem host
  hw=$(slurmd -C | head -1)
  host=$(hostname -s)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  # advertise 90% of the memory: slurmd drains a node whose RealMemory exceeds what it measures
  mem=$(( $(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw") * 9 / 10 ))
  cat <<EOF
# written by scripts/slurm/local_cluster.sh; edits are overwritten by the next \`up\`
ClusterName=spearlocal
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# short credential lifetime + scheduler interval: a requeued job starts again after ~12 s (not ~150 s)
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
# no cgroups on this machine: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
# seconds between SIGTERM and SIGKILL when a job is cancelled or requeued: time to save a checkpoint
KillWait=30
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmctldPort=6817
NodeName=${NODES[0]} NodeAddr=127.0.0.1 NodeHostname=$host Port=${PORTS[0]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=127.0.0.1 NodeHostname=$host Port=${PORTS[1]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }  # a pid file whose process runs

munge_up() {
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  [ -f /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || runuser -u munge -- munged
}

wait_idle() {  # until every node is idle (or already running jobs)
  local states=""
  for _ in $(seq 60); do
    states=$(sinfo -h -N -o '%T' 2>/dev/null || true)
    [ -n "$states" ] && ! grep -qvE '^(idle|mixed|allocated|completing)$' <<<"$states" && return 0
    sleep 0.5
  done
  echo "nodes not idle after 30 s: $(echo $states) (logs in $LOGS)" >&2
  return 1
}

up() {
  need_root up
  install
  mkdir -p "$CONF_DIR" "$STATE" "$LOGS" "${NODES[@]/#/$SPOOL/}"
  local new
  new=$(write_config)
  if [ -f "$CONF" ] && [ "$new" != "$(cat "$CONF")" ] && alive /run/slurmctld.pid; then
    echo "slurm.conf changed: restarting the cluster"
    down
  fi
  if [ ! -f "$CONF" ] || [ "$new" != "$(cat "$CONF")" ]; then printf '%s\n' "$new" >"$CONF"; fi
  munge_up
  alive /run/slurmctld.pid || slurmctld
  for n in "${NODES[@]}"; do
    alive "/run/slurmd-$n.pid" || slurmd -N "$n"
  done
  # nodes that an earlier run left DOWN or DRAINED come back (ReturnToService=2 covers most cases)
  for _ in $(seq 20); do scontrol ping >/dev/null 2>&1 && break; sleep 0.5; done
  scontrol update nodename="${NODES[0]},${NODES[1]}" state=resume >/dev/null 2>&1 || true
  wait_idle
  sinfo
}

down() {
  need_root down
  if alive /run/slurmctld.pid; then
    # running jobs' processes outlive slurmd: cancel them first and wait (KillWait) until they are gone
    local ids
    ids=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$ids" ]; then
      scancel $ids || true
      for _ in $(seq 90); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  local pids=() f p i
  # read each pid once: a daemon that `scontrol shutdown` reached removes its pid file at any moment
  for f in /run/slurmctld.pid /run/slurmd-*.pid; do
    p=$(cat "$f" 2>/dev/null) && kill -0 "$p" 2>/dev/null && pids+=("$p")
  done
  for i in $(seq 40); do
    local left=()
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left+=("$p"); done
    [ ${#left[@]} = 0 ] && break
    # daemons that `scontrol shutdown` did not reach (controller already gone): stop them by pid
    [ "$i" = 10 ] && kill "${left[@]}" 2>/dev/null
    sleep 0.5
  done
  if alive /run/munge/munged.pid; then runuser -u munge -- munged --stop >/dev/null 2>&1 || true; fi
  echo "local SLURM cluster stopped"
}

status() {
  if ! command -v sinfo >/dev/null || ! sinfo >/dev/null 2>&1; then
    echo "local SLURM cluster is not running (start it: sudo $0 up)"
    return 1
  fi
  sinfo
  squeue
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
