"""The command-line app: Hydra configs to a Trainer run (``cli``), side-by-side comparisons (``compare``)."""
