r"""Trains a language model from a checkout: the same as the installed `lmjax train`.

  python experiments/train.py --config=shakespeare_char:demo --workdir=workdirs/demo

See lmjax/commands/train.py for the flags.
"""
from lmjax.commands import train

if __name__ == "__main__":
    train.run()
