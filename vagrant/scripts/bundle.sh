#!/usr/bin/env bash
# What the VMs are provisioned from (the box has no synced folders: no NFS, no rsync):
#   $work/bundle/ambimesh-bundle.tar  src/ = `git archive HEAD` of this repository (committed
#       state only), wheels/ = ambimesh and every dependency, built here with pip;
#   $work/secrets/  the cluster's secrets, made once and kept: the mesh root CA
#       (`ambimesh install --create-ca`; the controller VM gets the key, nodes the cert)
#       and one join token per node (`ambimesh token create`; the controller VM gets
#       tokens.yaml, each node only its own token).
# Idempotent: rebuilds the bundle only when HEAD moved, and never with
# AMBIMESH_BUNDLE_FROZEN=1 once one exists (vagrant runs inside libvirt's network
# namespace, where pip reaches no index: run-test.sh makes the bundle first, outside).
# Needs the host's .venv (make setup).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
work=${AMBIMESH_VAGRANT_WORK:-/var/tmp/ambimesh-vagrant}
say() { printf '[bundle] %s\n' "$*"; }
die() { printf '[bundle] ERROR: %s\n' "$*" >&2; exit 1; }
[ -x .venv/bin/ambimesh ] || die "no .venv: run scripts/setup.sh (make setup) first"
mkdir -p "$work/bundle"
exec 9>"$work/bundle.lock"
flock -w 600 9 || die "another bundle.sh held $work/bundle.lock for 10 min"
head=$(git rev-parse HEAD)
if [ -s "$work/bundle/ambimesh-bundle.tar" ] && [ "$(cat "$work/bundle/HEAD" 2>/dev/null)" = "$head" ]; then
    say "bundle of $head present"
elif [ -s "$work/bundle/ambimesh-bundle.tar" ] && [ "${AMBIMESH_BUNDLE_FROZEN:-0}" = 1 ]; then
    say "bundle of $(cat "$work/bundle/HEAD") kept (AMBIMESH_BUNDLE_FROZEN=1; HEAD is $head)"
else
    say "bundle: git archive $head + pip wheel (log: $work/bundle/wheels.log)"
    rm -rf "$work/bundle/src" "$work/bundle/wheels" "$work/bundle/ambimesh-bundle.tar"
    mkdir -p "$work/bundle/src"
    git archive HEAD | tar -C "$work/bundle/src" -x
    .venv/bin/pip wheel --quiet --disable-pip-version-check --wheel-dir "$work/bundle/wheels" \
        "$work/bundle/src" >"$work/bundle/wheels.log" 2>&1 \
        || { tail -20 "$work/bundle/wheels.log"; die "pip wheel failed"; }
    tar -C "$work/bundle" -cf "$work/bundle/ambimesh-bundle.tar" src wheels
    echo "$head" >"$work/bundle/HEAD"
    say "bundle: $(ls "$work/bundle/wheels" | wc -l) wheels, $(du -m "$work/bundle/ambimesh-bundle.tar" | cut -f1) MB"
fi
secrets=$work/secrets
if [ ! -s "$secrets/ca/root-key.pem" ]; then
    say "secrets: a new mesh root CA in $secrets/ca"
    rm -rf "$secrets/ca"
    mkdir -p -m 700 "$secrets"
    .venv/bin/ambimesh install --create-ca "$secrets/ca" >/dev/null
fi
for node in node-1 node-2; do
    if [ ! -s "$secrets/$node.token" ]; then
        say "secrets: join token for $node"
        umask 077
        .venv/bin/ambimesh token create "$node" --tokens "$secrets/tokens.yaml" --rotate \
            >"$secrets/$node.token"
    fi
done
chmod -R go-rwx "$secrets"
