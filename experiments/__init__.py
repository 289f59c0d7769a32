"""Experiments: link emulator, compute profiles, benchmark harness and plots."""
