"""One module per `stdit` command: argument parsing and calls into the libraries, nothing else.

stdit/cli.py dispatches here; no library module imports this package."""
