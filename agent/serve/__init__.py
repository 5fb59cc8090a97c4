"""HTTP endpoints: the Nix binary cache protocol, health, and the admin API."""
