"""The ``workerpool`` command: the entry points over the services."""
