"""The command line: `lmjax COMMAND` (dispatched by `main.py`), one module per subcommand."""
