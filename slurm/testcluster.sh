#!/usr/bin/env bash
# A real single-node Slurm for the tests: slurmctld, slurmd, slurmdbd on MariaDB (submitit reads job
# states with sacct), munge; daemons on loopback (MariaDB on a socket only), state under $FTJOB_SLURM_DIR (default
# /tmp/ftjob-slurm). Needs root and Debian's packages, which `start` installs when missing.
#
#   slurm/testcluster.sh up       # idempotent: installs, configures, starts; returns once the node is idle
#   slurm/testcluster.sh down     # stops what up started, by the pids it recorded, and waits for them
#   slurm/testcluster.sh status   # exit 0 when the node answers
#
# Clients need SLURM_CONF=$FTJOB_SLURM_DIR/etc/slurm.conf (up prints it).
#
# Tuned for tests (shared/SLURM_TESTCLUSTER.md): short credential expiry and scheduler intervals so a
# requeued job comes back in seconds; no cgroups (proctrack/linuxproc); jobs run as root.
set -euo pipefail

DIR="${FTJOB_SLURM_DIR:-/tmp/ftjob-slurm}"
HOST="$(hostname -s)"
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
SOCKET=/run/mysqld/mysqld.sock
CLUSTER=ftjobci

log() { echo "testcluster: $*" >&2; }

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing ${missing[*]}"
    # Keep the packages' scripts from starting the daemons: this script starts them, on loopback.
    local policy=/usr/sbin/policy-rc.d created=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created=1
    fi
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    if [[ $created -eq 1 ]]; then rm -f "$policy"; fi
}

write_config() {
    mkdir -p "$DIR"/{etc,spool/ctld,spool/d,log,run,mysql}
    local memory
    memory="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
    memory=$((memory * 9 / 10))
    local cpus
    cpus="$(nproc)"
    cat > "$DIR/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=root
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq "$((seconds * 5))"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    log "timed out waiting for $what; logs in $DIR/log"
    tail -n 20 "$DIR"/log/*.log >&2 || true
    return 1
}

# A killed daemon stays a zombie until it is reaped, and kill -0 succeeds on a zombie.
alive() {
    [[ -f "$DIR/run/$1.pid" ]] || return 1
    local state
    state="$(ps -o stat= -p "$(cat "$DIR/run/$1.pid")" 2>/dev/null)" || return 1
    [[ $state != Z* ]]
}

stopped() { ! alive "$1"; }

start_munge() {
    alive munged && return
    [[ -f /etc/munge/munge.key ]] || mungekey --create
    mkdir -p "$DIR/munge"
    chown munge: "$DIR/munge"
    chown -R munge: /etc/munge
    mkdir -p /run/munge  # the socket at munge's default path, where every Slurm component looks
    chown munge: /run/munge
    runuser -u munge -- munged --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    ln -sf "$DIR/munge/munged.pid" "$DIR/run/munged.pid"
    wait_for 10 munged test -S /run/munge/munge.socket.2
}

start_mariadb() {
    alive mariadbd && return
    if [[ ! -d "$DIR/mysql/mysql" ]]; then
        mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=normal \
            >"$DIR/log/mariadb-install.log" 2>&1
    fi
    # A socket only, no TCP port: nothing but this machine's processes can reach it. The socket is at
    # the client library's default path, where slurmdbd looks (it has no socket setting).
    mkdir -p /run/mysqld
    mariadbd --user=root --datadir="$DIR/mysql" --socket="$SOCKET" \
        --pid-file="$DIR/run/mariadbd.pid" --skip-networking --log-error="$DIR/log/mariadb.log" &
    wait_for 30 mariadb mariadb --socket="$SOCKET" -uroot -e "select 1"
}

start_daemon() {  # start_daemon NAME COMMAND...
    local name=$1
    shift
    alive "$name" && return
    "$@"
    wait_for 20 "$name" alive "$name"
}

node_idle() { sinfo -h -N -o "%T" 2>/dev/null | grep -qE "^idle"; }

# A cluster that is not running starts from nothing: state left by a killed run would bring back its jobs
# (holding the node) and its accounting records (job ids start again at 1, and sacct would mix the two).
# The jobs of a killed run outlive their slurmstepd; they are known by the cluster's name in their environment.
forget_stopped_cluster() {
    alive slurmctld && return
    down
    local environ
    for environ in /proc/[0-9]*/environ; do
        if { tr '\0' '\n' <"$environ"; } 2>/dev/null | grep -qx "SLURM_CLUSTER_NAME=$CLUSTER"; then
            kill -9 "$(basename "$(dirname "$environ")")" 2>/dev/null || true
        fi
    done
    pkill -9 -x slurmstepd || true
    rm -rf "$DIR"/{spool,mysql,run}
}

up() {
    [[ $(id -u) -eq 0 ]] || { log "needs root"; exit 1; }
    install_packages
    forget_stopped_cluster
    write_config
    start_munge
    start_mariadb
    export SLURM_CONF="$DIR/etc/slurm.conf"
    start_daemon slurmdbd slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
    wait_for 30 slurmdbd bash -c "echo > /dev/tcp/127.0.0.1/6819"
    start_daemon slurmctld slurmctld -f "$SLURM_CONF"
    start_daemon slurmd slurmd -f "$SLURM_CONF"
    wait_for 60 "the node to be idle" node_idle
    log "up: export SLURM_CONF=$SLURM_CONF"
}

down() {
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        if alive "$name"; then
            kill "$(cat "$DIR/run/$name.pid")" 2>/dev/null || true
            wait_for 30 "$name to stop" stopped "$name" || true
        fi
    done
    log "stopped"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) alive slurmctld && alive slurmd && SLURM_CONF="$DIR/etc/slurm.conf" sinfo -h >/dev/null 2>&1 ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
