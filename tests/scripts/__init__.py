"""Programs the failure tests run as real processes (``python -m``-free: run by path)."""
