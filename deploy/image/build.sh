#!/usr/bin/env bash
# Builds drift's container image from a static `drift` binary: no base image, no registry.
#
#   deploy/image/build.sh [TAG]        # default: $DRIFT_IMAGE, else drift:dev
#
# The binary is a static-pie glibc build in its own target directory (target/static, so it
# never waits on the lock of the everyday target/ builds); cargo skips it when it is fresh,
# and docker reuses every layer when the binary has not changed, so a second run is quick and
# leaves the image as it was. Service names resolve without libc: libp2p's DNS transport reads
# the container's /etc/resolv.conf itself (use /dns4/<name>/tcp/<port> addresses).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
tag=${1:-${DRIFT_IMAGE:-drift:dev}}
host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${DRIFT_STATIC_TARGET_DIR:-$root/target/static}

# An explicit --target keeps crt-static off build scripts and proc macros.
RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --locked --target "$host" -p drift-node \
    --manifest-path "$root/Cargo.toml"
bin=$CARGO_TARGET_DIR/$host/release/drift

# A dynamically linked binary would not start in an image without a libc.
if command -v readelf >/dev/null && readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
    echo "$bin is dynamically linked; the image needs a static binary" >&2
    exit 1
fi

context=$CARGO_TARGET_DIR/image-context
rm -rf "$context"
mkdir -p "$context/rootfs/usr/local/bin" "$context/rootfs/etc" "$context/rootfs/tmp" \
    "$context/drift-owned/etc/drift" "$context/drift-owned/var/lib/drift"
install -m 0755 "$bin" "$context/rootfs/usr/local/bin/drift"
# Line tables are for the developer's build; the image keeps the symbols (named backtraces).
if command -v strip >/dev/null; then
    strip --strip-debug "$context/rootfs/usr/local/bin/drift"
fi
chmod 1777 "$context/rootfs/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\ndrift:x:10001:10001:drift:/var/lib/drift:/sbin/nologin\n' \
    >"$context/rootfs/etc/passwd"
printf 'root:x:0:\ndrift:x:10001:\n' >"$context/rootfs/etc/group"
chmod 0644 "$context/rootfs/etc/passwd" "$context/rootfs/etc/group"
chmod 0700 "$context/drift-owned/etc/drift" "$context/drift-owned/var/lib/drift"
cp "$root/deploy/image/Dockerfile" "$context/Dockerfile"

old=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
docker build --quiet --tag "$tag" "$context" >/dev/null
new=$(docker image inspect --format '{{.Id}}' "$tag")
# The image this one replaces, unless something still uses it.
if [ -n "$old" ] && [ "$old" != "$new" ]; then
    docker image rm "$old" >/dev/null 2>&1 || true
fi
size=$(docker image inspect --format '{{.Size}}' "$tag")
echo "built $tag ($((size / 1024 / 1024)) MiB) from $bin"
