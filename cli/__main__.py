"""``python -m cli``: the ``workerpool`` command (a worker node re-executes itself this way
to start its control process)."""

from cli.main import main

main()
