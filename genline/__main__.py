"""``python -m genline``: the same as the ``genline`` command."""

from genline.cli.main import main

main()
