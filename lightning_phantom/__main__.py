"""``python -m lightning_phantom``: one training run from conf/ (see lightning_phantom.app)."""

from lightning_phantom.app.cli import main

if __name__ == "__main__":
    main()
