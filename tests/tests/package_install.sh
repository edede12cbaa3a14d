#!/bin/sh
# Installs, upgrades, removes and purges the package in a throwaway copy of this machine's root,
# and prints what it sees for tests/tests/package.rs to judge.
#
# Usage: unshare --mount --pid --net --fork --kill-child --propagation private \
#            sh package_install.sh SCRATCH_DIR PACKAGE.deb
#
# The new namespaces make it safe: / is mounted read-only under an overlay whose writable layer
# is a tmpfs, so dpkg, addgroup and the maintainer scripts change only that layer; /run is an
# empty tmpfs, so the scripts find no systemd and leave the host's alone (as in a container);
# the network namespace has only the veth pair made here. Every mount, process and interface
# goes away with the namespaces when this script ends, however it ends.
set -eu

scratch=$1
deb=$2

mount -t tmpfs scratch "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
root=$scratch/root
mount -t tmpfs run "$root/run"
mount -t tmpfs tmp "$root/tmp"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount -t sysfs sysfs "$root/sys"
mount -t bpf bpf "$root/sys/fs/bpf"
cp "$deb" "$root/tmp/ipaccess.deb"

in_root() { chroot "$root" "$@"; }

# An interface for the daemon to filter, so that removing the package has a filter to take off.
ip link add ipa0 type veth peer name ipa1
ip link set ipa0 up
ip link set ipa1 up

echo "== install"
in_root dpkg -i /tmp/ipaccess.deb
echo "status: $(in_root dpkg-query -W -f='${Status}' ipaccess)"
echo "group: $(in_root getent group ipaccess)"
in_root dpkg-query -W -f='${Conffiles}\n' ipaccess | sed 's/^/conffile:/'
if [ -L "$root/etc/systemd/system/multi-user.target.wants/ipaccessd.service" ]; then
    echo "enabled: yes"
fi

echo "== daemon"
# Started by hand (no systemd here) with the packaged configuration, like the unit does.
in_root useradd --system --no-create-home --groups ipaccess ipa-operator
in_root useradd --system --no-create-home ipa-outsider
# chroot itself, not in_root: $! must be the daemon (chroot execs it), not a subshell.
chroot "$root" ipaccessd --iface ipa0 >"$scratch/daemon.log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null || true; cat "$scratch/daemon.log" >&2' EXIT
tries=0
until in_root ipaccessctl status >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ $tries -gt 100 ]; then
        echo "ipaccessd did not answer within 10 s" >&2
        exit 1
    fi
    sleep 0.1
done
echo "socket: $(in_root stat -c '%G %a' /run/ipaccess/ipaccessd.sock)"
# A member of group ipaccess may administer; anyone else cannot even connect.
if in_root setpriv --reuid ipa-operator --regid ipa-operator --init-groups ipaccessctl account add acme >/dev/null; then
    echo "operator account add: ok"
fi
if ! in_root setpriv --reuid ipa-outsider --regid ipa-outsider --init-groups ipaccessctl status >/dev/null 2>&1; then
    echo "outsider status: refused"
fi
kill -TERM $daemon
wait $daemon || true
trap - EXIT
if ip link show ipa0 | grep -q xdp; then
    echo "after stop: filter attached"
fi

echo "== upgrade"
echo "# edited by the administrator" >>"$root/etc/ipaccess/ipaccessd.toml"
in_root dpkg -i /tmp/ipaccess.deb
echo "status: $(in_root dpkg-query -W -f='${Status}' ipaccess)"
echo "group: $(in_root getent group ipaccess)"
echo "groups named ipaccess: $(grep -c '^ipaccess:' "$root/etc/group")"
if grep -q "edited by the administrator" "$root/etc/ipaccess/ipaccessd.toml"; then
    echo "config edit: kept"
fi

echo "== remove"
in_root dpkg --remove ipaccess
if ! ip link show ipa0 | grep -q xdp; then
    echo "after remove: filter detached"
fi
[ -e "$root/usr/bin/ipaccessd" ] || echo "after remove: binaries gone"
[ -e "$root/etc/ipaccess/ipaccessd.toml" ] && echo "after remove: config kept"
[ -e "$root/var/lib/ipaccess/ipaccess.db" ] && echo "after remove: store kept"

echo "== purge"
in_root dpkg --purge ipaccess
[ -e "$root/etc/ipaccess/ipaccessd.toml" ] || echo "after purge: config gone"
[ -e "$root/var/lib/ipaccess" ] || echo "after purge: store gone"
echo "after purge: group: $(in_root getent group ipaccess)"
echo "== done"
