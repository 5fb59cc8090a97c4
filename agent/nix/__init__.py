"""The Nix formats: pure functions, no I/O."""
