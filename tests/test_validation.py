"""Every setting is checked before compute: a table of bad settings through the validation the
launcher calls (each error names the field and what is allowed), and a handful through the real
launcher (exit code 2, one line, no traceback, no step run)."""
import os
import subprocess
import sys

import jax
import pytest

from lmjax import run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = jax.device_count()

# (field=value, a fragment the message must hold besides the field name: what is allowed)
BAD = [
    ("seed=-1", ">= 0"),
    ("optim.learning_rate=nan", "finite"),
    ("optim.learning_rate=-0.001", ">= 0"),
    ("optim.learning_rate=inf", "finite"),
    ("optim.min_learning_rate=-1e-5", "[0, optim.learning_rate"),
    ("optim.min_learning_rate=0.5", "[0, optim.learning_rate"),
    ("optim.b1=1.0", "[0, 1)"),
    ("optim.b1=-0.1", "[0, 1)"),
    ("optim.b2=1.5", "[0, 1)"),
    ("optim.b2=nan", "[0, 1)"),
    ("optim.eps=0.0", "> 0"),
    ("optim.weight_decay=-0.1", ">= 0"),
    ("optim.weight_decay=nan", ">= 0"),
    ("optim.grad_clip=-1.0", ">= 0"),
    ("optim.warmup_steps=-5", ">= 0"),
    ("optim.warmup_steps=500", "at most train.num_steps"),
    ("optim.decay_steps=-1", ">= 0"),
    ("optim.grad_accum=0", ">= 1"),
    ("train.num_steps=0", ">= 1"),
    ("train.log_every=0", ">= 1"),
    ("train.steps_per_call=0", ">= 1"),
    ("train.eval_every=-5", "0 = only at the end"),
    ("train.checkpoint_every=-1", "0 = only at the end"),
    ("train.keep_checkpoints=0", ">= 1"),
    ("train.eval_batches=0", "-1 (the whole validation set)"),
    ("train.eval_batches=-2", "-1 (the whole validation set)"),
    ("train.final_eval_batches=-3", "0 (= train.eval_batches)"),
    ("train.num_samples=-1", ">= 0"),
    ("train.sample_len=0", ">= 1"),
    ("train.sample_temperature=-0.5", ">= 0"),
    ("train.sample_temperature=nan", ">= 0"),
    ("train.sample_top_k=-3", ">= 0"),
    ("data.seq_len=0", ">= 1"),
    ("data.batch_size=0", ">= 1"),
    ("data.seq_len=64", "model.max_len=32"),
    ("data.val_fraction=0.0", "(0, 1)"),
    ("data.val_fraction=1.0", "(0, 1)"),
    ("data.seed=-2", ">= 0"),
    ("data.source=banana", "shakespeare, files, jsonl, tfds"),
    ("data.encoding_errors=banana", "strict, replace, ignore"),
    ("data.packing=banana", "auto, documents, stream"),
    ("data.shard_mb=0", "> 0"),
    ("data.prepare_workers=-1", ">= 0"),
    ("data.train_files=/nonexistent/*.txt", "matches no file"),
    ("data.val_files=/nonexistent/val.txt", "matches no file"),
    ("tokenizer.kind=banana", "char"),
    ("mesh.data=0", "divisor of the"),
    ("mesh.fsdp=-2", "divisor of the"),
    (f"mesh.data={NUM_DEVICES * 3}", "divisor of the"),
    ("mesh.data=-1,mesh.fsdp=-1", "at most one size -1"),
    ("mesh.dcn_data=0", ">= 1"),
    ("mesh.rules.embed=banana", "data, fsdp, tensor"),
    ("model.num_heads=3", "must divide"),
    ("model.num_kv_heads=3", "must divide"),
    ("model.dropout=1.0", "[0, 1)"),
    ("model.norm=banana", "layernorm, rmsnorm"),
    ("model.position=rope,model.head_dim=15", "model.head_dim"),
    ("model.norm_eps=0.0", "> 0"),
    ("model.rope_theta=-1.0", "> 0"),
    ("model.dtype=float16", "bfloat16"),
    ("model.quantization=int8", "lora.rank > 0"),  # int8 trains adapters only (QLoRA)
    ("lora.weight_decay=-0.1", ">= 0"),
    ("model.num_layers=0", "positive integer"),
]


def _set(config, assignment: str) -> str:
    """Applies 'a.b=v[,c.d=w]' to `config`; returns the first field's name."""
    fields = []
    for part in assignment.split(","):
        path, value = part.split("=", 1)
        *sections, name = path.split(".")
        node = config
        for section in sections:
            node = node[section]
        old = node[name]
        node[name] = (type(old)(float(value)) if isinstance(old, (int, float))
                      and not isinstance(old, bool) and value not in ("nan", "inf")
                      else float(value) if value in ("nan", "inf") else value)
        fields.append(path)
    return fields[0]


def test_table_has_forty_settings():
    assert len(BAD) >= 40 and len({a for a, _ in BAD}) == len(BAD)


@pytest.mark.parametrize("assignment, allowed", BAD, ids=[a for a, _ in BAD])
def test_bad_setting_is_named_with_what_is_allowed(tiny_config, assignment, allowed):
    config = tiny_config(num_samples=2)
    field = _set(config, assignment)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        run_config.prepare_config(config)
    message = str(e.value)
    name = field.rsplit(".", 1)[-1]
    assert name in message and allowed in message, message


def test_mesh_error_lists_divisors(tiny_config):
    config = tiny_config()
    config.mesh.data = NUM_DEVICES * 3
    with pytest.raises(ValueError) as e:
        run_config.prepare_config(config)
    divisors = [d for d in range(1, NUM_DEVICES + 1) if NUM_DEVICES % d == 0]
    assert f"divisor of the {NUM_DEVICES} devices: {', '.join(map(str, divisors))}" in str(e.value)


def test_unknown_key_suggests_the_closest(tiny_config):
    config = tiny_config()
    config.train["eval_evry"] = 3
    with pytest.raises(ValueError, match=r"train.eval_evry.*did you mean train.eval_every"):
        run_config.prepare_config(config)


# ----------------------------------------------------------------------------- the launcher


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, pigs_text):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(pigs_text)
    return str(path)


TINY = ["--config.model.num_layers=1", "--config.model.embed_dim=32", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.data.seq_len=32", "--config.data.batch_size=4",
        "--config.train.num_steps=3", "--config.optim.warmup_steps=1",
        "--config.train.eval_batches=1", "--config.train.num_samples=1",
        "--config.train.progress_bar=false"]


def _bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    return {"empty": str(tmp_path / "empty.txt")}


def test_non_utf8_file_is_named_with_the_byte(tiny_config, tmp_path):
    from lmjax import data as data_lib
    config = tiny_config()
    path = tmp_path / "latin1.txt"
    path.write_bytes(("ok " * 10 + "caf\xe9\n").encode("latin-1") * 50)
    config.data.train_files = str(path)
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text: byte 33 .*"
                                         r"data.encoding_errors='replace'"):
        data_lib.build_data(run_config.prepare_config(config))
    config.data.encoding_errors = "replace"
    tokenizer = data_lib.build_data(run_config.prepare_config(config)).tokenizer
    assert len(tokenizer.encode("caf\ufffd")) == 4  # the replacement character is in the vocabulary

@pytest.mark.parametrize("override, field", [
    ("optim.learning_rate=nan", "optim.learning_rate"),
    ("tokenizer.kind=banana", "tokenizer.kind"),  # these three used to end in "cannot schedule
    ("data.train_files={empty}", "empty.txt"),  # new futures after interpreter shutdown"
    ("train.sample_prompt=\u00e9t\u00e9", "train.sample_prompt"),  # after the tokenizer
])
def test_launcher_bad_setting_is_one_line_exit_2(text_file, tmp_path, override, field):
    override = override.format(**_bad_files(tmp_path))
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "experiments", "train.py"),
         f"--config=tiny_shakespeare_char:{text_file}", f"--workdir={workdir}", *TINY,
         f"--config.{override}"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert lines[-1].startswith("lmjax train: error: ") and field in lines[-1], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "cannot schedule new futures" not in done.stderr
    assert not (workdir / "metrics.jsonl").exists()  # no step ran
    assert "starting from scratch" not in done.stdout
