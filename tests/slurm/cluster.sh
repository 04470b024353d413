#!/usr/bin/env bash
# cluster.sh -- a real single-node SLURM for the tests: Debian's munged, slurmctld and slurmd
# started by hand (no systemd, no cgroups), two fake GPUs declared as a GPU GRES, two partitions
# (cpu, default; gpu). Adapted from ../shared/slurm/single-node-slurm.sh.
#
#   bash tests/slurm/cluster.sh start    # (re)start our daemons, wait until the node is idle
#   bash tests/slurm/cluster.sh stop     # stop only the daemons whose pid we recorded
#   bash tests/slurm/cluster.sh install  # apt-get the packages if a binary is missing
#
# State, logs and fake GPU devices live under $VLMFLOW_SLURM_DIR (default /tmp/vlmflow-slurm); the
# config must be /etc/slurm/slurm.conf (SLURM_CONF does not reach the jobs: the plugin's job step
# drops SLURM_* variables before its nested srun). A slurm.conf that this script did not write is
# never overwritten. Runs as root. Every wait is bounded: hangs are silent.
#
# Traps found on the way (SLURM 22.05, plugin 2.8.0):
#  - no systemd/cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none;
#  - gres.conf File= must be character devices (mknod c 1 3), Count= alone makes the node INVAL;
#  - no slurmdbd => sacct is useless; the snakemake plugin must use `squeue`, which it only does
#    when MinJobAge >= 3 x slurm-init-seconds-before-status-checks;
#  - without DefMemPerCPU a job without --mem takes the whole node and jobs run one at a time.
set -euo pipefail

BASE=${VLMFLOW_SLURM_DIR:-/tmp/vlmflow-slurm}
NGPU=${NGPU:-2}
HOST=$(hostname -s)
RUN=$BASE/run
LOG=$BASE/log
SPOOL=$BASE/spool
CONF=/etc/slurm/slurm.conf
MARK="# written by vlmflow tests/slurm/cluster.sh"
say() { echo "[cluster.sh] $*" >&2; }

install() {
  local pkgs=""
  command -v slurmctld >/dev/null || pkgs="$pkgs slurmctld"
  command -v slurmd >/dev/null || pkgs="$pkgs slurmd"
  command -v sbatch >/dev/null || pkgs="$pkgs slurm-client"
  command -v munged >/dev/null || pkgs="$pkgs munge"
  if [ -n "$pkgs" ]; then
    say "apt-get install$pkgs"
    apt-get update -q
    # the postinst scripts try systemd and complain; harmless, we start the daemons by hand
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs
  fi
}

write_config() {
  mkdir -p "$RUN" "$LOG" "$SPOOL/ctld" "$SPOOL/d" "$BASE/fakegpu" /etc/slurm
  if [ -s "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    say "$CONF exists and was not written by this script: refusing to overwrite it"
    exit 1
  fi
  local cpus mem_mb i
  cpus=$(nproc)
  # RealMemory above the real memory makes the node INVAL: leave 15% to the OS
  mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 85 / 100))
  for i in $(seq 0 $((NGPU - 1))); do
    rm -f "$BASE/fakegpu/nvidia$i"
    mknod "$BASE/fakegpu/nvidia$i" c 1 3 # a /dev/null twin: GRES files must be devices
  done
  cat >"$CONF" <<EOF
$MARK
ClusterName=vlmflowci
SlurmctldHost=${HOST}(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
MinJobAge=300
KillWait=10
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:a100:$NGPU State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF
  cat >/etc/slurm/gres.conf <<EOF
$MARK
NodeName=$HOST Name=gpu Type=a100 File=$BASE/fakegpu/nvidia[0-$((NGPU - 1))]
EOF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
  local f p
  for f in "$RUN/slurmd.pid" "$RUN/slurmctld.pid" "$RUN/munged.pid"; do
    if alive "$f"; then
      p=$(cat "$f")
      say "stopping pid $p ($(ps -o comm= -p "$p"))"
      kill "$p"
      for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$p" 2>/dev/null; then kill -9 "$p"; fi
    fi
    rm -f "$f"
  done
}

start() {
  stop
  write_config
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running (not ours): reusing it"
  else
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
    cp /run/munge/munged.pid "$RUN/munged.pid"
    munge -n | unmunge >/dev/null
  fi
  say "starting slurmctld"
  rm -rf "${SPOOL:?}/ctld"/* "${SPOOL:?}/d"/*
  slurmctld -c
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  alive "$RUN/slurmctld.pid" || { tail -5 "$LOG/slurmctld.log" >&2; exit 1; }
  say "starting slurmd"
  slurmd
  local st=""
  for _ in $(seq 100); do
    st=$(sinfo -h -n "$HOST" -o %T | head -1)
    case "$st" in idle | mixed | allocated) break ;; esac
    sleep 0.3
  done
  if [ "$st" != idle ]; then
    scontrol update nodename="$HOST" state=resume || true
    sleep 1
    st=$(sinfo -h -n "$HOST" -o %T | head -1)
  fi
  [ "$st" = idle ] || { tail -20 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2; exit 1; }
  say "node $HOST idle: $(sinfo -h -o '%P %D %G' | tr '\n' ' ')"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
