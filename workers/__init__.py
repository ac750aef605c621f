"""Compute workers: one process per core, each leasing slots and running the SwiGLU kernel."""
