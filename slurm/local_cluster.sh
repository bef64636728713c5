#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for the tests and for trying the SLURM path on a
# workstation: Debian's slurm 22.05 + munge, with slurmdbd/mariadb accounting (submitit reads job
# states through sacct). Needs root and apt (Debian/Ubuntu); no systemd needed.
#
#   slurm/local_cluster.sh start [NODES]   install if needed, start 1 or 2 emulated nodes (default 2)
#   slurm/local_cluster.sh stop            stop every daemon it started
#   slurm/local_cluster.sh status          sinfo and the daemons' pids
#
# Nodes are n1 (and n2): slurmd daemons on 127.0.0.1, ports 17001/17002, each with this machine's CPUs.
# It writes /etc/slurm/slurm.conf and slurmdbd.conf (files it did not write are kept as *.dr-resnet-backup
# and put back by `stop`) and one marked line in /etc/hosts (removed by `stop`).
set -euo pipefail

NODES=${2:-2}
CLUSTER=localcluster
CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurmctld
RUN=/run/dr-resnet-slurm
MYSQL_SOCKET=/run/mysqld/mysqld.sock

MARK="# written by dr-resnet slurm/local_cluster.sh"

log() { echo "[local_cluster] $*" >&2; }

back_up() {  # a config file someone else wrote is kept aside once, and put back by `stop`
    if [ -f "$1" ] && ! grep -qF "$MARK" "$1" && [ ! -e "$1.dr-resnet-backup" ]; then
        cp -p "$1" "$1.dr-resnet-backup"
        log "kept the existing $1 as $1.dr-resnet-backup (stop puts it back)"
    fi
}

restore() {  # undo write_config: the files it replaced back, its own removed, its /etc/hosts line gone
    local file
    for file in "$CONF" /etc/slurm/slurmdbd.conf; do
        if [ -e "$file.dr-resnet-backup" ]; then
            mv -f "$file.dr-resnet-backup" "$file"
        elif [ -f "$file" ] && grep -qF "$MARK" "$file"; then
            rm -f "$file"
        fi
    done
    if grep -q "# dr-resnet local cluster$" /etc/hosts 2>/dev/null; then
        grep -v "# dr-resnet local cluster$" /etc/hosts >/etc/hosts.dr-resnet.tmp || true
        cat /etc/hosts.dr-resnet.tmp >/etc/hosts  # in place: /etc/hosts may be a bind mount
        rm -f /etc/hosts.dr-resnet.tmp
    fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION LOGFILE COMMAND...: on a timeout, show the daemon's log
    local limit=$1 what=$2 logfile=$3
    shift 3
    for _ in $(seq "$((limit * 4))"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    log "timed out after ${limit}s waiting for $what"
    if [ -s "$logfile" ]; then
        log "last lines of $logfile:"
        tail -n 20 "$logfile" | sed 's/^/    /' >&2
    fi
    return 1
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || { log "installing SLURM needs root"; exit 3; }
    command -v apt-get >/dev/null || { log "installing SLURM needs apt-get (Debian/Ubuntu)"; exit 3; }
    log "installing munge, slurm and mariadb (Debian packages)"
    # Package scripts try to start services; there is no init system to do so here.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client slurmdbd \
        mariadb-server >/dev/null
    rm -f /usr/sbin/policy-rc.d
}

write_config() {
    local host mem cpus
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9 / '"$NODES"'}' /proc/meminfo)
    mkdir -p /etc/slurm "$STATE" /var/spool/slurmd /var/log/slurm "$RUN"
    back_up "$CONF"
    back_up /etc/slurm/slurmdbd.conf
    {
        echo "$MARK"
        echo "ClusterName=$CLUSTER"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "AuthInfo=cred_expire=10"
        echo "CredType=cred/munge"
        echo "MailProg=/bin/true"
        echo "MpiDefault=none"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "SchedulerType=sched/backfill"
        echo "SchedulerParameters=sched_interval=2,bf_interval=2"
        echo "AccountingStorageType=accounting_storage/slurmdbd"
        echo "AccountingStorageHost=localhost"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "StateSaveLocation=$STATE"
        echo "SlurmdSpoolDir=/var/spool/slurmd/%n"
        echo "SlurmctldPidFile=$RUN/slurmctld.pid"
        echo "SlurmdPidFile=$RUN/slurmd-%n.pid"
        echo "SlurmctldLogFile=/var/log/slurm/slurmctld.log"
        echo "SlurmdLogFile=/var/log/slurm/slurmd-%n.log"
        echo "ReturnToService=2"
        echo "MinJobAge=600"
        echo "KillWait=5"
        # A time-based first job id: a fresh controller state never hands out ids a test folder saw.
        echo "FirstJobId=$(( $(date +%s) % 1000000 + 1000 ))"
        for i in $(seq "$NODES"); do
            echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF"
    cat >/etc/slurm/slurmdbd.conf <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$RUN/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
EOF
    chmod 600 /etc/slurm/slurmdbd.conf
    # The emulated node names must resolve (gloo's rendezvous address is the first node's name).
    local names
    names=$(seq -f "n%g" -s " " "$NODES")
    grep -q "dr-resnet local cluster" /etc/hosts || echo "127.0.0.1 $names # dr-resnet local cluster" >>/etc/hosts
    sed -i "s/^127.0.0.1 .* # dr-resnet local cluster$/127.0.0.1 $names # dr-resnet local cluster/" /etc/hosts
}

start_munge() {
    mkdir -p /run/munge /etc/munge
    chown munge:munge /run/munge
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || runuser -u munge -- /usr/sbin/munged
    wait_for 20 munge /var/log/munge/munged.log sh -c 'munge -n | unmunge'
}

start_accounting() {
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    if ! mariadb-admin --socket=$MYSQL_SOCKET ping >/dev/null 2>&1; then
        setsid mariadbd --user=mysql --bind-address=127.0.0.1 --socket=$MYSQL_SOCKET \
            --pid-file=/run/mysqld/mariadb.pid >/var/log/slurm/mariadb.log 2>&1 < /dev/null &
        wait_for 60 mariadb /var/log/slurm/mariadb.log mariadb-admin --socket=$MYSQL_SOCKET ping
    fi
    # The account is this script's: a 'slurm' user left by another set-up, with another password, gets
    # the password slurmdbd.conf names (otherwise slurmdbd cannot log in and never answers).
    mariadb --socket=$MYSQL_SOCKET -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        ALTER USER 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    pgrep -x slurmdbd >/dev/null || slurmdbd
    wait_for 60 slurmdbd /var/log/slurm/slurmdbd.log sacctmgr -n show cluster
    sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

start() {
    [ "$(id -u)" = 0 ] || { log "the local cluster needs root"; exit 3; }
    case "$NODES" in 1 | 2) ;; *) log "NODES must be 1 or 2"; exit 2 ;; esac
    install_packages
    stop quiet
    write_config
    start_munge
    start_accounting
    slurmctld
    wait_for 60 slurmctld /var/log/slurm/slurmctld.log sh -c 'scontrol ping | grep -q UP'
    for i in $(seq "$NODES"); do slurmd -N "n$i"; done
    # ReturnToService=2 brings nodes back; resume any left DOWN by an earlier, killed run.
    scontrol update nodename="n[1-$NODES]" state=resume >/dev/null 2>&1 || true
    wait_for 60 "$NODES idle node(s)" /var/log/slurm/slurmd-n1.log sh -c "[ \$(sinfo -h -N -o '%T' | grep -c idle) -ge $NODES ]"
    log "cluster '$CLUSTER' up: $(sinfo -h -N -o '%N %T %c' | tr '\n' ' ')"
}

stop() {
    local pidfile pid
    for pidfile in "$RUN"/slurmd-*.pid "$RUN"/slurmctld.pid "$RUN"/slurmdbd.pid /run/mysqld/mariadb.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
    [ "${1:-}" = quiet ] && return 0
    restore
    log "stopped; the files it replaced under /etc are back"
}

status() {
    sinfo -N -o '%N %T %c %m' 2>/dev/null || log "controller not answering"
    ls "$RUN"/*.pid 2>/dev/null || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start [1|2] | stop | status" >&2; exit 2 ;;
esac
