#!/usr/bin/env bash
# Install (if missing) and start a one-node SLURM cluster on this machine, for CI and the tests
# under tests/cluster/. Idempotent: running it again with the daemons up only prints `sinfo`.
#
#   sudo cluster/slurm-one-node.sh          # start (needs root: apt, munge, slurm daemons)
#   sudo cluster/slurm-one-node.sh stop     # stop the daemons it started (by their pid files)
#
# State lives under $SLURM_ONE_NODE_DIR (default /tmp/slurm). Real clusters run several nodes; this
# stands one node with several CPU "tasks" in for them (see docs/cluster.md).
set -euo pipefail

DIR=${SLURM_ONE_NODE_DIR:-/tmp/slurm}
CPUS=${SLURM_ONE_NODE_CPUS:-$(nproc)}
MEM=${SLURM_ONE_NODE_MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ "${1:-start}" = "stop" ]; then
  for pid in "$DIR/d.pid" "$DIR/ctld.pid"; do
    if running "$pid"; then kill "$(cat "$pid")"; fi
  done
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "slurm-one-node.sh: needs root (apt-get, munged, slurmctld, slurmd)" >&2
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null \
   || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

H=$(hostname -s)
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /var/run/munge /etc/slurm
[ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
chown -R munge:munge /etc/munge /var/run/munge
chmod 400 /etc/munge/munge.key
if ! pgrep -u munge -x munged >/dev/null; then
  su -s /bin/sh munge -c /usr/sbin/munged
fi

CONF=/etc/slurm/slurm.conf
NEW=$(cat <<CONF
# Written by scalegen cluster/slurm-one-node.sh: a one-node cluster for tests.
ClusterName=local
SlurmctldHost=$H
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/ctld.log
SlurmdLogFile=$DIR/log/d.log
SlurmctldPidFile=$DIR/ctld.pid
SlurmdPidFile=$DIR/d.pid
ReturnToService=2
# Let a test requeue a job without waiting minutes for it to become eligible again.
JobRequeue=1
NodeName=$H CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
)
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW" ]; then
  printf '%s\n' "$NEW" > "$CONF"
  # A changed config needs fresh daemons.
  for pid in "$DIR/d.pid" "$DIR/ctld.pid"; do
    if running "$pid"; then kill "$(cat "$pid")"; sleep 1; fi
  done
fi

running "$DIR/ctld.pid" || /usr/sbin/slurmctld
running "$DIR/d.pid" || /usr/sbin/slurmd
for _ in $(seq 30); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qE 'idle|mixed|alloc'; then break; fi
  sleep 1
done
# A node that was down (e.g. after a restart) is returned to service.
scontrol update NodeName="$H" State=RESUME >/dev/null 2>&1 || true
sinfo
