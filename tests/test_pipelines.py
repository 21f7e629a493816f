"""lmjax.pipeline("text-generation", ...) and the sample launcher's generation flags, on a random
GPT-2 folder with a byte-level BPE (what `save_pretrained` writes), against transformers."""
import os
import subprocess
import sys

import pytest
import tokenizers
import torch

import lmjax
from conftest import write_random_gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, pigs_text):
    folder = str(tmp_path_factory.mktemp("gpt2"))
    model = write_random_gpt2(folder, pigs_text, vocab_size=300, n_positions=128)
    return folder, model


def hf_greedy_text(folder, model, prompt, new_tokens):
    bpe = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    ids = torch.tensor([bpe.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, pad_token_id=0)  # eos 0 from config.json
    generated = [t for t in out[0, ids.shape[1]:].tolist() if t != 0]
    return prompt + bpe.decode(generated)


def test_pipeline_greedy_matches_transformers(gpt2):
    """The folder's defaults (transformers': greedy; eos from config.json) and HF's output."""
    folder, model = gpt2
    generator = lmjax.pipeline("text-generation", model=folder, max_new_tokens=10)
    assert generator.sampling.is_greedy and generator.sampling.eos_ids == (0,)
    out = generator("3 little")
    assert out == [{"generated_text": hf_greedy_text(folder, model, "3 little", 10)}]
    batch = generator(["3 little", "9 pigs went"], return_full_text=False)
    assert [len(x) for x in batch] == [1, 1]
    assert "3 little" + batch[0][0]["generated_text"] == out[0]["generated_text"]


def test_pipeline_options(gpt2):
    folder, _ = gpt2
    generator = lmjax.pipeline("text-generation", model=folder)
    samples = generator(["3 little", "9"], do_sample=True, max_new_tokens=12,
                        num_return_sequences=3, temperature=1.5, seed=1)
    assert [len(x) for x in samples] == [3, 3]
    assert all(s["generated_text"].startswith("9") for s in samples[1])
    beams = generator("3 little", num_beams=3, num_return_sequences=2, max_new_tokens=12,
                      no_repeat_ngram_size=2)
    assert len(beams) == 2 and beams[0] != beams[1]
    [free] = generator("3 little", max_new_tokens=20, return_full_text=False)
    text = free["generated_text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    [cut] = generator("3 little", max_new_tokens=20, return_full_text=False, stop=stop)
    assert cut["generated_text"] == text[:text.index(stop)]
    with pytest.raises(ValueError, match="unknown generation options \\['top_q'\\]"):
        generator("3", top_q=0.5)
    with pytest.raises(ValueError, match="task='summarization' is not supported"):
        lmjax.pipeline("summarization", model=folder)


def test_sample_launcher_generation_flags(gpt2):
    folder, _ = gpt2
    done = subprocess.run(
        [sys.executable, "experiments/sample.py", f"--hf_model={folder}", "--prompt=3 little",
         "--num_beams=3", "--num_return_sequences=2", "--no_repeat_ngram_size=2",
         "--max_new_tokens=12", "--early_stopping=never", "--repetition_penalty=1.2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    samples = done.stdout.split("-" * 40 + "\n")[1:]
    assert len(samples) == 2 and all(s.startswith("3 little") for s in samples)
    bad = subprocess.run([sys.executable, "experiments/sample.py", f"--hf_model={folder}",
                          "--num_beams=2", "--num_return_sequences=3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert bad.returncode != 0 and "sampling.num_return_sequences=3 must be <= num_beams=2" \
        in bad.stderr


def test_pipeline_from_a_params_export(tmp_path, pigs_text):
    """model= an lmjax folder (here a params export of a random model with a char tokenizer):
    the same text as sample_text with the same options."""
    import jax

    from lmjax import checkpoint, sample, tokenizers
    from lmjax.config import preset
    from lmjax.model import init_params
    tokenizer = tokenizers.CharTokenizer.train([pigs_text])
    config = preset("nanogpt_baby", vocab_size=tokenizer.vocab_size, embed_dim=32, mlp_dim=64,
                    num_layers=2, num_heads=4, max_len=64)
    params = init_params(config, jax.random.key(0))
    folder = checkpoint.export_params(str(tmp_path / "export"), params, config, tokenizer)
    generator = lmjax.pipeline("text-generation", model=folder, max_new_tokens=12)
    [out] = generator("3 little", do_sample=True, temperature=0.9, seed=3, stop="\n")
    [expected] = sample.sample_text(params, config, tokenizer, ["3 little"],
                                    sample.SamplingConfig(12, temperature=0.9, stop="\n"), seed=3)
    assert out == {"generated_text": "3 little" + expected} and "\n" not in expected
