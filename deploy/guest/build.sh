#!/usr/bin/env bash
# Builds drift's tiny QEMU test guest from Debian packages: a kernel and an initramfs, no disk.
#
#   deploy/guest/build.sh [OUT_DIR]     # default: $DRIFT_GUEST_DIR, else ~/.cache/drift/guest
#
# Produces OUT_DIR/vmlinuz (from the versioned package linux-image-cloud-amd64 depends on),
# OUT_DIR/initrd.img (gzip'd newc cpio: busybox-static plus the /init below) and OUT_DIR/stamp.
# The stamp holds this script's sha256 and the exact package versions; when it matches, the
# script does nothing and exits 0 (about a second: one apt-cache query, no network). Packages are
# fetched with `apt-get download` and unpacked with `dpkg-deb -x` in a temp dir: nothing is
# installed, except cpio if the host lacks it. Root is needed only for `apt-get update` (when
# there are no apt lists) and `apt-get install cpio`. Boot it with (-accel tcg works too, ready
# in about 4 s; see README.md for hosts where -accel kvm hangs):
#
#   qemu-system-x86_64 -accel kvm -m 256 -nographic -no-reboot -nic none \
#       -kernel OUT_DIR/vmlinuz -initrd OUT_DIR/initrd.img \
#       -append 'console=ttyS0 panic=-1 quiet drift.marker=MARKER123'
#
# The guest prints `drift-guest ready`, then `drift-heartbeat <n> uptime=<s>` about every 100 ms
# on ttyS0, and keeps rewriting a 32 MiB tmpfs region filled with the marker.
set -euo pipefail

out=$(realpath -m "${1:-${DRIFT_GUEST_DIR:-$HOME/.cache/drift/guest}}")
self=$(readlink -f "$0")

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else
        echo "build.sh: '$*' needs root" >&2
        return 1
    fi
}

# The versioned kernel package the metapackage depends on (it pins the exact version) and
# busybox-static, as name=version lines, from the local apt lists (fetched if this host has none).
resolve() {
    pkgs=$(apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static 2>/dev/null |
        awk '
        /^Package: / { p = $2 }
        p == "linux-image-cloud-amd64" && match($0, /^Depends: linux-image-[^ ,]+ \(= [^)]+\)/) {
            split(substr($0, 10, RLENGTH - 10), d, / \(= /); print d[1] "=" d[2] }
        p == "busybox-static" && /^Version: / { print p "=" $2 }')
    [ "$(wc -l <<<"$pkgs")" = 2 ]
}
if ! resolve; then
    as_root apt-get update -q
    resolve || { echo "build.sh: no linux-image-cloud-amd64/busybox-static in apt" >&2; exit 1; }
fi

stamp="script=$(sha256sum "$self" | cut -d' ' -f1)
$pkgs"
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] &&
    [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi

command -v cpio >/dev/null || as_root apt-get install -y -q cpio
command -v gzip >/dev/null || { echo "build.sh: gzip is missing" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# As root, apt hands downloads to the _apt user, who cannot write to our 0700 temp dir, and
# falls back to downloading as root with a warning; ask for that directly.
download() { apt-get download -q -o APT::Sandbox::User=root $pkgs; }
if ! download; then # stale lists: the mirror has moved on to newer versions
    as_root apt-get update -q
    resolve
    download
fi
dpkg-deb -x linux-image-*.deb kernel
dpkg-deb -x busybox-static_*.deb bb

# Everything /init needs is built in to Debian's cloud kernel, so the initramfs carries no
# modules; fail loudly if a future kernel changes that.
for opt in BLK_DEV_INITRD RD_GZIP DEVTMPFS TMPFS SERIAL_8250 SERIAL_8250_CONSOLE; do
    grep -qx "CONFIG_$opt=y" kernel/boot/config-* || {
        echo "build.sh: kernel lacks built-in CONFIG_$opt" >&2
        exit 1
    }
done

mkdir -p root/bin root/dev root/proc root/sys root/dirty
cp bb/bin/busybox root/bin/
for applet in $(bb/bin/busybox --list); do
    [ -e "root/bin/$applet" ] || ln -s busybox "root/bin/$applet"
done

cat >root/init <<'EOF'
#!/bin/sh
# drift test guest, PID 1: plants the marker in a tmpfs region it keeps rewriting, prints
# heartbeats on ttyS0, never exits. Kernel parameters (all optional):
#   drift.marker=S           string written all over the region (default drift-no-marker)
#   drift.dirty_mib=N        region size in MiB (default 32; 0: no dirtying)
#   drift.dirty_pause_ms=N   pause after rewriting each MiB of it (default 50)
#   drift.heartbeat_ms=N     heartbeat interval (default 100)
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/null >/dev/ttyS0 2>&1

arg() {
    for w in $(cat /proc/cmdline); do
        case $w in "$1="*) echo "${w#*=}"; return ;; esac
    done
    echo "$2"
}
marker=$(arg drift.marker drift-no-marker)
mib=$(arg drift.dirty_mib 32)
pause_ms=$(arg drift.dirty_pause_ms 50)
beat_ms=$(arg drift.heartbeat_ms 100)

# Rewrites the region in place (same pages), MiB by MiB, with "<marker> pass=$1" lines, pausing
# $2 ms after each MiB; with no pause, in one dd from one pipe (no process per MiB): as fast as
# the guest can write.
pass() {
    if [ "$2" -eq 0 ]; then
        yes "$marker pass=$1" |
            dd of=/dirty/mem bs=1048576 count="$mib" iflag=fullblock conv=notrunc 2>/dev/null
        return
    fi
    yes "$marker pass=$1" | head -c 1048576 >/chunk
    i=0
    while [ $i -lt "$mib" ]; do
        dd if=/chunk of=/dirty/mem bs=1048576 seek=$i conv=notrunc 2>/dev/null
        i=$((i + 1))
        [ "$2" -gt 0 ] && usleep $(($2 * 1000))
    done
}
if [ "$mib" -gt 0 ]; then
    mount -t tmpfs -o size=$((mib + 1))m dirty /dirty
    pass 0 0
    # Then forever, at most 1 MiB per pause (20 MiB/s by default): well below QEMU's default
    # migration bandwidth (128 MiB/s), so precopy converges.
    (
        p=0
        while :; do
            p=$((p + 1))
            pass $p "$pause_ms"
        done
    ) &
fi

# Firmware leaves escape sequences with no newline on the serial line: start a fresh line.
echo
echo "drift-guest ready"
n=0
while :; do
    n=$((n + 1))
    read -r up _ </proc/uptime
    echo "drift-heartbeat $n uptime=$up"
    usleep $((beat_ms * 1000))
done
EOF
chmod 755 root/init

mkdir -p "$out"
cp kernel/boot/vmlinuz-* "$out/vmlinuz.tmp"
# Fixed owners, times and order: the same packages give the same initrd, byte for byte.
find root -exec touch -h -d @0 {} +
(cd root && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) |
    gzip -9n >"$out/initrd.img.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "$stamp" >"$out/stamp"
echo "built $out/{vmlinuz,initrd.img} from" $pkgs
