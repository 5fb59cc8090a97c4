"""The shared hostPath store: a valid Nix binary cache directory plus an index."""
