"""``python -m lightning_phantom.compare``: phantom against tensor parallelism (see ``lightning_phantom.app.compare``)."""

from lightning_phantom.app.compare import main

if __name__ == "__main__":
    main()
