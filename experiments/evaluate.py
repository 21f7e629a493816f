r"""Evaluates a run or a Hugging Face folder: the same as the installed `lmjax eval`.

  python experiments/evaluate.py --workdir=workdirs/demo --task=perplexity --data=val

See lmjax/commands/evaluate.py for the flags.
"""
from lmjax.commands import evaluate

if __name__ == "__main__":
    evaluate.run()
