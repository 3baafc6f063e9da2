#!/bin/busybox sh
# livemig guest /init (PID 1 of the initramfs).
#
# Why this shape: the guest only exists to run the memory workload on the serial
# console, so there is no udev, no root filesystem and no service manager. PID 1
# must never exit (that panics the kernel), so after the workload ends it prints
# "LIVEMIG EXIT <code>" and keeps a busybox shell on the console forever.
#
# Kernel command line (read from /proc/cmdline; dotted names never reach init's argv):
#   livemig.wss=<MiB>          working set of the workload (default 64)
#   livemig.rate=<MiB/s>       initial dirty rate (default 20)
#   livemig.workload=on|off    run the workload or go straight to the shell (default on)
#   livemig.disk=<device>      disk mode: the workload appends a checksummed log to this raw
#                              block device (e.g. /dev/vda; default off)
#   livemig.diskrate=<n>       records per second in disk mode (default 40)
#   livemig.ip=<a.b.c.d/len>   network mode: address eth0 with this before the workload starts,
#                              which then serves TCP echo (7) and a UDP sequence sink (9)
#   livemig.gw=<a.b.c.d>       default route via this gateway (network mode only)

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mount -t tmpfs tmpfs /dev
[ -c /dev/console ] || mknod /dev/console c 5 1
[ -c /dev/ttyS0 ] || mknod /dev/ttyS0 c 4 64
[ -c /dev/null ] || mknod /dev/null c 1 3
exec </dev/console >/dev/console 2>&1

# Modules in dependency order (computed at image build time from each .ko's .modinfo).
# A missing device is not an error: insmod of a driver without hardware succeeds anyway,
# and any real failure is reported but never stops the boot.
if [ -r /lib/modules/load-order ]; then
    while read -r module; do
        [ -n "$module" ] || continue
        insmod "$module" 2>/dev/null || echo "livemig-init: insmod $module failed" >/dev/console
    done </lib/modules/load-order
fi
ip link set lo up 2>/dev/null

wss=64
rate=20
workload=on
disk=
diskrate=40
ip=
gw=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        livemig.wss=*) wss="${arg#livemig.wss=}" ;;
        livemig.rate=*) rate="${arg#livemig.rate=}" ;;
        livemig.workload=*) workload="${arg#livemig.workload=}" ;;
        livemig.disk=*) disk="${arg#livemig.disk=}" ;;
        livemig.diskrate=*) diskrate="${arg#livemig.diskrate=}" ;;
        livemig.ip=*) ip="${arg#livemig.ip=}" ;;
        livemig.gw=*) gw="${arg#livemig.gw=}" ;;
    esac
done

# Network mode: static addressing only (no DHCP client to wait for; the vswitch or slirp side
# knows the address from the same command line). The NIC's driver was loaded above, but its
# netdev can register a moment later, so wait briefly for it. A failure is reported on the
# console and the workload still starts: its memory and disk witnesses do not need the network.
if [ -n "$ip" ]; then
    tries=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$tries" -lt 50 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    if ! ip addr add "$ip" dev eth0 || ! ip link set eth0 up; then
        echo "LIVEMIG ERR network: cannot configure eth0 with $ip" >/dev/ttyS0
    elif [ -n "$gw" ] && ! ip route add default via "$gw" dev eth0; then
        echo "LIVEMIG ERR network: cannot add the default route via $gw" >/dev/ttyS0
    fi
fi

if [ "$workload" = on ]; then
    set -- -w "$wss" -r "$rate"
    [ -z "$disk" ] || set -- "$@" -d "$disk" -D "$diskrate"
    [ -z "$ip" ] || set -- "$@" -n "${ip%/*}"
    # Own stdin/stdout on the serial port; no controlling tty, so no stray byte can signal it.
    /bin/livemig-workload "$@" </dev/ttyS0 >/dev/ttyS0 2>&1
    echo "LIVEMIG EXIT $?" >/dev/ttyS0
fi

echo "LIVEMIG SHELL" >/dev/ttyS0
while :; do
    setsid cttyhack sh </dev/ttyS0 >/dev/ttyS0 2>&1
    sleep 1
done
