#!/usr/bin/env bash
# Prepares the compose lab cluster (deploy/compose.yaml) before its first start, with the same
# steps as on real hosts (README, "Deploying"), each node being a container:
#
#   1. `compose up --no-start`: the private network, the volumes and the node containers,
#      created and not running;
#   2. the admin key and the roster draft in the admin directory, outside the cluster;
#   3. each node's key, made inside that node's /etc/drift volume (it never leaves it);
#   4. the roster: one member per node, signed with the admin key;
#   5. distribution: the signed roster and the node's drift.toml (deploy/config/drift.lab.toml
#      with the admin's id) copied into every node's /etc/drift.
#
# Then start the cluster with `docker-compose -p PROJECT -f deploy/compose.yaml up -d`.
#
#   deploy/compose-init.sh [-p PROJECT] [--admin-dir DIR] [--image IMAGE]
#
# PROJECT defaults to $COMPOSE_PROJECT_NAME, else drift; DIR to ./drift-admin; IMAGE to
# $DRIFT_IMAGE, else drift:dev (build it with deploy/image/build.sh). Every drift command runs
# in a throwaway container of that image, so the host needs only docker. Run it again and the
# keys are kept, the roster and the configs rewritten; `down -v` removes everything but the
# admin directory.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
project=${COMPOSE_PROJECT_NAME:-drift}
admin_dir=drift-admin
image=${DRIFT_IMAGE:-drift:dev}
while [ $# -gt 0 ]; do
    case $1 in
        -p | --project) project=$2; shift 2 ;;
        --admin-dir) admin_dir=$2; shift 2 ;;
        --image) image=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "compose-init.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose)
else
    echo "compose-init.sh: neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 1
fi
compose+=(-p "$project" -f "$root/deploy/compose.yaml")
export DRIFT_IMAGE=$image
if ! docker image inspect "$image" >/dev/null 2>&1; then
    echo "compose-init.sh: no image $image; build it with deploy/image/build.sh" >&2
    exit 1
fi

step() { printf '== %s\n' "$*" >&2; }

step "1. network, volumes and stopped containers of project $project"
"${compose[@]}" up --no-start
mapfile -t services < <("${compose[@]}" config --services | grep '^node-' | sort -V)

step "2. admin key and roster draft in $admin_dir"
mkdir -p "$admin_dir"
chmod 0700 "$admin_dir"
admin_dir=$(cd "$admin_dir" && pwd)
# As the invoking user, so the admin's files belong to them.
admin() {
    docker run --rm --network none --user "$(id -u):$(id -g)" \
        -v "$admin_dir:$admin_dir" -w "$admin_dir" "$image" "$@"
}
if [ -e "$admin_dir/admin.key" ]; then
    admin_id=$(admin id admin.key)
else
    admin_id=$(admin keygen --out admin.key)
fi
admin roster init --cluster "$project" --out roster.toml --force

# Labels as an admin would attest them: three regions, each in one jurisdiction.
regions=(eu-west eu-central us-east)
jurisdictions=(fr de us)
declare -A containers
for i in "${!services[@]}"; do
    svc=${services[$i]}
    ctr=$("${compose[@]}" ps -a -q "$svc")
    containers[$svc]=$ctr
    step "3. key of $svc, made in its own volume"
    on_node() { docker run --rm --network none --volumes-from "$ctr" "$image" "$@"; }
    if ! id=$(on_node id /etc/drift/node.key 2>/dev/null); then
        id=$(on_node keygen --out /etc/drift/node.key)
    fi
    step "4. $svc ($id) joins the roster"
    admin roster add roster.toml --name "$svc" --id "$id" \
        --label "region=${regions[$((i % 3))]}" \
        --label "jurisdiction=${jurisdictions[$((i % 3))]}" \
        --cpus 16 --mem-mib 65536
done
step "4. the admin signs the roster"
admin roster sign roster.toml --admin-key admin.key --out roster --force
admin roster verify roster --admin "$admin_id" >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for svc in "${services[@]}"; do
    step "5. roster and drift.toml to $svc"
    sed -e "s|^admin = .*|admin = \"$admin_id\"   # the cluster admin|" \
        -e "\|\"/dns4/$svc/tcp/|d" \
        "$root/deploy/config/drift.lab.toml" >"$work/drift.toml"
    cp "$admin_dir/roster" "$work/roster"
    chmod 0644 "$work/drift.toml" "$work/roster"
    docker cp "$work/drift.toml" "${containers[$svc]}:/etc/drift/drift.toml"
    docker cp "$work/roster" "${containers[$svc]}:/etc/drift/roster"
done

echo "cluster $project ready: ${#services[@]} nodes, admin $admin_id (key in $admin_dir)"
echo "start it: ${compose[*]} up -d"
