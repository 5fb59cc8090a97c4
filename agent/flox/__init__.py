"""Flox environments: lockfiles, FloxHub over git, and the generation watch."""
