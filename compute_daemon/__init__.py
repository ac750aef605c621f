"""The compute daemon: accepts client work, splits it into expert tasks, runs them on workers."""
