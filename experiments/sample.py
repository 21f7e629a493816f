r"""Samples from a trained run or a Hugging Face folder: the same as the installed `lmjax sample`.

  python experiments/sample.py --workdir=workdirs/demo --prompt="ROMEO." --num_samples=3

See lmjax/commands/sample.py for the flags.
"""
from lmjax.commands import sample

if __name__ == "__main__":
    sample.run()
