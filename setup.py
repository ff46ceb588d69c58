"""Packaging that setup.cfg cannot say: the top-level ``conf/`` ships inside the package.

``conf/`` stays where users read and copy it; the wheel carries it as ``lightning_phantom/conf``
(package data), which the app finds when it runs from an installed package
(``lightning_phantom.app.cli.CONF_DIR``). Everything else is in setup.cfg.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["lightning_phantom", "lightning_phantom.*"]) + ["lightning_phantom.conf"],
    package_dir={"lightning_phantom.conf": "conf"},
    package_data={"lightning_phantom.conf": ["*.yaml", "*/*.yaml"]},
)
