#!/bin/sh
# Add flox-node-cache to the node's Nix configuration, idempotently; or, with
# --uninstall, take it out again.
#
# Writes $NIX_CONF_DIR/flox-node-cache.conf and appends one
# `!include flox-node-cache.conf` line to $NIX_CONF_DIR/nix.conf, once. Nix
# resolves a relative include next to the file that includes it, so the line
# is right whatever the host calls the directory. Before its first change to
# nix.conf it copies the original to nix.conf.bak-flox-node-cache. Every write
# is temp file + rename, so a crash never leaves a half-written nix.conf.
#
# The drop-in puts two substituters ahead of every other one:
#   1. the agent's hostPath store, read directly as a file:// binary cache: it
#      keeps serving what the node has while the agent restarts (a daemon that
#      has used an HTTP substituter fails the pod start when it is down);
#   2. the agent itself (misses are fetched from the upstreams and verified).
# Their priorities are negative: Nix gives a cache whose nix-cache-info has no
# `Priority:` line priority 0, so any positive number could lose to it; no
# cache advertises less than 0.
#
# The nix-daemon reads nix.conf when it starts: restart it on the node
# (`systemctl restart nix-daemon`) or let the next node reboot pick it up.
set -eu

# Where the host's /etc/nix is mounted in this container.
NIX_CONF_DIR="${NIX_CONF_DIR:-/host/etc/nix}"
# Optional: write an absolute include of HOST_NIX_CONF_DIR/flox-node-cache.conf
# instead (when nix.conf is not where the drop-in is). The path must then be
# readable in this container at that same path, which is checked.
HOST_NIX_CONF_DIR="${HOST_NIX_CONF_DIR:-}"
SUBSTITUTER="${SUBSTITUTER:-http://127.0.0.1:37515?priority=-1}"
# The agent's store as the host's nix-daemon reads it (empty: not used).
FILE_STORE="${FILE_STORE-file:///var/lib/flox-node-cache?priority=-2}"
# The agent's GC roots in the node's store (--node-gcroots-dir), as mounted
# here: --uninstall removes them, so the node's next GC frees what they held.
NODE_GCROOTS_DIR="${NODE_GCROOTS_DIR:-}"
# The agent serves narinfo with the upstream caches' signatures.
TRUSTED_PUBLIC_KEYS="${TRUSTED_PUBLIC_KEYS:-cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY= flox-cache-public-1:7F4OyH7ZCnFhcze3fJdfyXYLQw/aV7GEed86nQ7IsOs=}"

DROPIN="$NIX_CONF_DIR/flox-node-cache.conf"
NIX_CONF="$NIX_CONF_DIR/nix.conf"
BACKUP="$NIX_CONF.bak-flox-node-cache"
if [ -n "$HOST_NIX_CONF_DIR" ]; then
  INCLUDE="!include $HOST_NIX_CONF_DIR/flox-node-cache.conf"
else
  INCLUDE="!include flox-node-cache.conf"
fi

log() { echo "configure-nix: $*"; }
die() { echo "configure-nix: ERROR: $*" >&2; exit 1; }

if [ ! -d "$NIX_CONF_DIR" ]; then
  die "$NIX_CONF_DIR does not exist: is Nix installed on this node? Nothing changed."
fi

# Replace $1 with stdin, atomically; keep $1's mode and owner if it exists.
replace_file() {
  tmp=$(mktemp "$NIX_CONF_DIR/.flox-node-cache.XXXXXX")
  if [ -e "$1" ]; then cp -p "$1" "$tmp"; else chmod 0644 "$tmp"; fi
  cat >"$tmp"
  mv -f "$tmp" "$1"
}

# Every include line this script ever wrote (relative or absolute).
is_our_include() { grep -qE '^!?include ([^ ]*/)?flox-node-cache\.conf$'; }

uninstall() {
  if [ -f "$NIX_CONF" ] && [ ! -L "$NIX_CONF" ] && is_our_include <"$NIX_CONF"; then
    grep -vE '^!?include ([^ ]*/)?flox-node-cache\.conf$' "$NIX_CONF" | replace_file "$NIX_CONF"
    log "removed the include from $NIX_CONF"
  fi
  if [ -e "$DROPIN" ]; then rm -f "$DROPIN"; log "removed $DROPIN"; fi
  if [ -n "$NODE_GCROOTS_DIR" ] && [ -d "$NODE_GCROOTS_DIR" ]; then
    # Only the agent's holder directories (each marked by a .holder file).
    for marker in "$NODE_GCROOTS_DIR"/*/.holder; do
      [ -e "$marker" ] || continue
      rm -rf "$(dirname "$marker")"
    done
    rmdir "$NODE_GCROOTS_DIR" 2>/dev/null || true
    log "removed the agent's GC roots in $NODE_GCROOTS_DIR"
  fi
  log "restart the nix-daemon on this node: systemctl restart nix-daemon"
}

if [ "${1:-}" = "--uninstall" ]; then
  uninstall
  exit 0
fi

# NixOS (and other declarative setups) link nix.conf into the store: editing it
# is wrong and would not survive a rebuild. Configure it there instead.
if [ -L "$NIX_CONF" ]; then
  log "$NIX_CONF is a symlink (NixOS?): not editing it. Add to your configuration:"
  log "  extra-substituters = ${FILE_STORE:+$FILE_STORE }$SUBSTITUTER"
  log "  extra-trusted-public-keys = $TRUSTED_PUBLIC_KEYS"
  exit 0
fi

dropin_content() {
  echo "# Written by flox-node-cache (daemonset/components/node-config); changes are overwritten."
  echo "# Negative priorities: ahead of any remote cache, whatever its nix-cache-info says."
  echo "extra-substituters = ${FILE_STORE:+$FILE_STORE }$SUBSTITUTER"
  echo "extra-trusted-public-keys = $TRUSTED_PUBLIC_KEYS"
}

if [ -f "$DROPIN" ] && [ "$(dropin_content)" = "$(cat "$DROPIN")" ]; then
  log "$DROPIN is up to date"
else
  dropin_content | replace_file "$DROPIN"
  log "wrote $DROPIN"
fi

# `!include` ignores a missing file: an include the host cannot read would
# silently leave the node without the cache.
if [ -n "$HOST_NIX_CONF_DIR" ] && [ ! -r "$HOST_NIX_CONF_DIR/flox-node-cache.conf" ]; then
  die "the include would point at $HOST_NIX_CONF_DIR/flox-node-cache.conf, which is not" \
      "readable here: mount the host's Nix configuration directory at its host path, or" \
      "leave HOST_NIX_CONF_DIR unset (relative include). nix.conf not changed."
fi

if [ -f "$NIX_CONF" ] && grep -qxF "$INCLUDE" "$NIX_CONF"; then
  log "$NIX_CONF already includes it"
  exit 0
fi
if [ -f "$NIX_CONF" ]; then
  [ -e "$BACKUP" ] || cp -p "$NIX_CONF" "$BACKUP"
  {
    # An include written by an older version (another path) is replaced.
    grep -vE '^!?include ([^ ]*/)?flox-node-cache\.conf$' "$NIX_CONF" || true
    echo "$INCLUDE"
  } | replace_file "$NIX_CONF"
  log "added '$INCLUDE' to $NIX_CONF (original saved as $BACKUP)"
else
  echo "$INCLUDE" | replace_file "$NIX_CONF"
  log "created $NIX_CONF with '$INCLUDE'"
fi
log "restart the nix-daemon on this node to use the cache: systemctl restart nix-daemon"
