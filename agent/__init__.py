"""flox-node-cache: a node-local Nix binary cache for Flox pods."""

__version__ = "0.1.0"
