"""Configuration and command-line flags (torch-free)."""
