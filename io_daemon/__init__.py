"""The I/O daemon: streams expert regions from the store into the shared slot pool."""
