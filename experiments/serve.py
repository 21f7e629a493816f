r"""Serves a trained run or a Hugging Face folder over an OpenAI-compatible HTTP API: the same as
the installed `lmjax-serve`.

  python experiments/serve.py --workdir=workdirs/demo --port=8000

See lmjax/commands/serve.py for the flags.
"""
from lmjax.commands import serve

if __name__ == "__main__":
    serve.run()
