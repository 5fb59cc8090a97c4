"""The node's own Nix store: realise pinned closures into it through its nix-daemon, as an
untrusted client, and keep them there with one GC root per holder and top-level path.

  relay.py     a byte pipe to the daemon socket, run as a non-root uid (the sidecar)
  nixstore.py  the `nix-store` client: validity, realise + root, errors with reasons
  roots.py     the GC roots directory: one subdirectory per holder
  realiser.py  what should be rooted (pins, budget) and making it so
"""
