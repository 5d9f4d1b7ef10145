"""The benchmark suite of the listener: run it with `python -m bench`."""
