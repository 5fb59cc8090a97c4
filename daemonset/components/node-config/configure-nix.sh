#!/bin/sh
# Add flox-node-cache to the node's Nix configuration, idempotently.
#
# Writes $NIX_CONF_DIR/flox-node-cache.conf (the substituter and its keys) and
# appends one `!include` line for it to $NIX_CONF_DIR/nix.conf, once. Before
# its first change to nix.conf it copies the original to
# nix.conf.bak-flox-node-cache. Every write is temp file + rename, so a
# crash never leaves a half-written nix.conf for the nix-daemon.
#
# The nix-daemon reads nix.conf when it starts: restart it on the node
# (`systemctl restart nix-daemon`) or let the next node reboot pick it up.
set -eu

# Where the host's /etc/nix is mounted in this container.
NIX_CONF_DIR="${NIX_CONF_DIR:-/host/etc/nix}"
# The same directory as the host's Nix sees it (for the !include line).
HOST_NIX_CONF_DIR="${HOST_NIX_CONF_DIR:-/etc/nix}"
SUBSTITUTER="${SUBSTITUTER:-http://127.0.0.1:37515?priority=10}"
# The agent serves narinfo with the upstream caches' signatures.
TRUSTED_PUBLIC_KEYS="${TRUSTED_PUBLIC_KEYS:-cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY= flox-cache-public-1:7F4OyH7ZCnFhcze3fJdfyXYLQw/aV7GEed86nQ7IsOs=}"

DROPIN="$NIX_CONF_DIR/flox-node-cache.conf"
NIX_CONF="$NIX_CONF_DIR/nix.conf"
BACKUP="$NIX_CONF.bak-flox-node-cache"
INCLUDE="!include $HOST_NIX_CONF_DIR/flox-node-cache.conf"

log() { echo "configure-nix: $*"; }

if [ ! -d "$NIX_CONF_DIR" ]; then
  log "$NIX_CONF_DIR does not exist: is Nix installed on this node? Nothing changed."
  exit 1
fi
# NixOS (and other declarative setups) link nix.conf into the store: editing it
# is wrong and would not survive a rebuild. Configure it there instead.
if [ -L "$NIX_CONF" ]; then
  log "$NIX_CONF is a symlink (NixOS?): not editing it. Add to your configuration:"
  log "  extra-substituters = $SUBSTITUTER"
  log "  extra-trusted-public-keys = $TRUSTED_PUBLIC_KEYS"
  exit 0
fi

# Replace $1 with stdin, atomically; keep $1's mode and owner if it exists.
replace_file() {
  tmp=$(mktemp "$NIX_CONF_DIR/.flox-node-cache.XXXXXX")
  if [ -e "$1" ]; then cp -p "$1" "$tmp"; else chmod 0644 "$tmp"; fi
  cat >"$tmp"
  mv -f "$tmp" "$1"
}

dropin_content() {
  echo "# Written by flox-node-cache (daemonset/overlays/node-config); changes are overwritten."
  echo "extra-substituters = $SUBSTITUTER"
  echo "extra-trusted-public-keys = $TRUSTED_PUBLIC_KEYS"
}

if [ -f "$DROPIN" ] && [ "$(dropin_content)" = "$(cat "$DROPIN")" ]; then
  log "$DROPIN is up to date"
else
  dropin_content | replace_file "$DROPIN"
  log "wrote $DROPIN"
fi

if [ -f "$NIX_CONF" ] && grep -qxF "$INCLUDE" "$NIX_CONF"; then
  log "$NIX_CONF already includes it"
  exit 0
fi
if [ -f "$NIX_CONF" ]; then
  [ -e "$BACKUP" ] || cp -p "$NIX_CONF" "$BACKUP"
  {
    cat "$NIX_CONF"
    # Do not glue the include onto an unterminated last line.
    if [ -n "$(tail -c 1 "$NIX_CONF")" ]; then echo; fi
    echo "$INCLUDE"
  } | replace_file "$NIX_CONF"
  log "added '$INCLUDE' to $NIX_CONF (original saved as $BACKUP)"
else
  echo "$INCLUDE" | replace_file "$NIX_CONF"
  log "created $NIX_CONF with '$INCLUDE'"
fi
log "restart the nix-daemon on this node to use the cache: systemctl restart nix-daemon"
