"""`python -m lmjax COMMAND ...`: the same as the installed `lmjax` command."""
from lmjax.commands.main import main

if __name__ == "__main__":
    main()
