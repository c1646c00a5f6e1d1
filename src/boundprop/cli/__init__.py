"""The ``boundprop`` command (see :func:`boundprop.cli.main.main`)."""
