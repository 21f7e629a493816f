"""Genre classification of Shakespeare passages: lmjax encoders against TF-IDF and transformers.

  python benchmarks/encoder_quality.py [--steps 300] [--mlm_steps 300] [--seeds 0,1,2]
      [--learning_rate 2e-3] [--mlm_learning_rate 1e-3] [--torch_threads 1]

The task (lmjax/labelled.py): passages of 8 lines of the embedded corpus's plays, labelled with
the First Folio genre of their play (comedy / history / tragedy; poems left out); whole plays
are held out, 6 for validation and 6 for test, so no play is in two splits. Rows, each scored
on the test plays (accuracy, macro-F1; mean and spread over the seeds):
  1. scikit-learn TF-IDF (word 1-2 grams) + logistic regression on the training passages;
  2. the lmjax encoder of shakespeare_genre (small settings) fine-tuned from scratch;
  3. the same, first pretrained with masked LM on the training plays' text only;
  4. transformers' BertForSequenceClassification with the same architecture, the same initial
     weights (lmjax's, exported), the same batches, AdamW schedule, clipping and weight decay,
     in a plain PyTorch loop (the peer), from scratch.
Prints one JSON object per run and a Markdown table (wall time, ms per training step).
"""
import argparse
import functools
import json
import os
import statistics
import tempfile
import time

import numpy as np

import _env  # benchmarks/_env.py: versions and machine
from lmjax import classify, configs, hf_bert, labelled, run_config, tokenizers, train


def shared_tokenizer(folder: str) -> str:
    """One WordPiece tokenizer for every run, trained on the training plays (the demo's
    vocabulary size): the rows then differ in their training only, and none trains its own."""
    path = folder + "/tokenizer"
    vocab = configs.get("shakespeare_genre:demo").tokenizer.vocab_size
    tokenizers.WordPieceTokenizer.train(
        [t[0] for t, _ in labelled.shakespeare_genre("train")], vocab).save(path)
    return path


def small_config(steps: int, seed: int, tokenizer: str, learning_rate: float = 2e-3):
    config = configs.get("shakespeare_genre:demo")
    config.seed = config.data.seed = seed
    config.tokenizer.path = tokenizer
    config.train.update(num_steps=steps, eval_every=0, eval_batches=8, checkpoint_every=0,
                        progress_bar=False)
    config.optim.update(learning_rate=learning_rate, min_learning_rate=learning_rate / 10,
                        warmup_steps=max(steps // 10, 1))
    return config


def scores(truth, predicted) -> dict:
    from sklearn import metrics
    return {"accuracy": metrics.accuracy_score(truth, predicted),
            "macro_f1": metrics.f1_score(truth, predicted, average="macro")}


def tfidf_row(train_examples, test_examples) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    start = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    x = vectorizer.fit_transform([t[0] for t, _ in train_examples])
    model = LogisticRegression(max_iter=2000, C=10.0).fit(x, [y for _, y in train_examples])
    predicted = model.predict(vectorizer.transform([t[0] for t, _ in test_examples]))
    return {"run": "TF-IDF + logistic regression", "seed": 0,
            **scores([y for _, y in test_examples], predicted),
            "wall_s": time.perf_counter() - start, "step_ms": None}


def lmjax_row(name, config, workdir, test_examples) -> dict:
    start = time.perf_counter()
    result = train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    classifier = classify.load_classifier(workdir=workdir)
    predicted = [p["label"] for p in classify.predict(classifier, [t[0] for t, _ in
                                                                   test_examples])]
    # ms/step: the training loop's time after the first (compiling) call, over those steps:
    # compile, evaluation and checkpoints left out (train_and_evaluate's own breakdown), as the
    # peer's loop times its steps after the first.
    steps = config.train.num_steps
    return {"run": name, "seed": config.seed, **scores([y for _, y in test_examples], predicted),
            "wall_s": wall, "step_ms": 1000 * result["seconds"]["train"] / max(steps - 1, 1),
            "seconds": {k: round(v, 1) for k, v in result["seconds"].items()}}


def mlm_workdir(steps: int, seed: int, folder: str, tokenizer: str,
                learning_rate: float = 1e-3) -> str:
    """Masked-LM pretraining on the genre task's training plays only (never the test plays)."""
    texts = folder + "/train_plays.txt"
    with open(texts, "w", encoding="utf-8") as f:
        f.write("\n".join(t[0] for t, _ in labelled.shakespeare_genre("train")))
    config = configs.get("shakespeare_mlm:demo")
    config.seed = config.data.seed = seed
    config.tokenizer.path = tokenizer
    config.data.store_dir = folder + "/mlm_store"
    config.data.source, config.data.train_files = "files", texts
    config.train.update(num_steps=steps, eval_every=0, eval_batches=4, checkpoint_every=0,
                        progress_bar=False)
    config.optim.update(learning_rate=learning_rate, min_learning_rate=learning_rate / 10,
                        warmup_steps=max(steps // 10, 1))
    workdir = folder + "/mlm"
    train.train_and_evaluate(config, workdir)
    return workdir


def peer_row(config, workdir, test_examples) -> dict:
    """transformers' BertForSequenceClassification, lmjax's initial weights and batches."""
    import torch
    import transformers
    from lmjax import encoder as encoder_lib
    import jax
    torch.manual_seed(config.seed)
    os.makedirs(workdir, exist_ok=True)
    data = labelled.build_data(config, workdir)
    mcfg = run_config.model_config(config, data.tokenizer.vocab_size)
    params = encoder_lib.init_params(mcfg, jax.random.split(jax.random.key(config.seed))[0])
    hf_bert.save_hf_bert(workdir + "/hf", mcfg, params, data.tokenizer, data.label_names)
    model = transformers.BertForSequenceClassification.from_pretrained(workdir + "/hf")
    steps, optim = config.train.num_steps, config.optim
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=optim.learning_rate,
                            betas=(optim.b1, optim.b2), eps=optim.eps)

    def lr(step):  # optax.warmup_cosine_decay_schedule, as a factor of the peak
        if step < optim.warmup_steps:
            return step / optim.warmup_steps
        t = (step - optim.warmup_steps) / max(steps - optim.warmup_steps, 1)
        floor = optim.min_learning_rate / optim.learning_rate
        return floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        if step == 1:  # as lmjax's step time: the steps after the first
            first = time.perf_counter()
        batch = data.train.batch(step)
        out = model(input_ids=torch.tensor(batch["inputs"], dtype=torch.long),
                    attention_mask=torch.tensor(batch["mask"], dtype=torch.long),
                    token_type_ids=torch.tensor(batch["token_types"], dtype=torch.long),
                    labels=torch.tensor(batch["labels"][:, 0], dtype=torch.long))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        sched.step()
    end = time.perf_counter()
    wall, step_ms = end - start, 1000 * (end - first) / max(steps - 1, 1)
    model.eval()
    ids, types = labelled.encode_examples(data.tokenizer, [t for t, _ in test_examples],
                                          config.data.seq_len)
    predicted = []
    with torch.no_grad():
        for i in range(0, len(ids), 64):
            b = labelled.pad_batch(ids[i:i + 64], types[i:i + 64], config.data.seq_len, 0)
            logits = model(input_ids=torch.tensor(b["inputs"], dtype=torch.long),
                           attention_mask=torch.tensor(b["mask"], dtype=torch.long),
                           token_type_ids=torch.tensor(b["token_types"], dtype=torch.long)).logits
            predicted += [data.label_names[k] for k in logits.argmax(-1).tolist()]
    return {"run": "transformers BertForSequenceClassification (PyTorch loop)",
            "seed": config.seed, **scores([y for _, y in test_examples], predicted),
            "wall_s": wall, "step_ms": step_ms}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mlm_steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="fine-tuning peak")
    parser.add_argument("--mlm_learning_rate", type=float, default=1e-3)
    parser.add_argument("--torch_threads", type=int, default=1,
                        help="the peer's torch.set_num_threads (0: torch's default). On a loaded "
                        "machine OpenMP's spinning threads make 2 threads ~9x slower than 1.")
    args = parser.parse_args()
    if args.torch_threads:
        import torch
        torch.set_num_threads(args.torch_threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    env = _env.environment(peers=("torch", "transformers", "scikit-learn"))
    print(json.dumps({"environment": env, "steps": args.steps, "mlm_steps": args.mlm_steps,
                      "seeds": seeds, "torch_threads": args.torch_threads,
                      "learning_rate": args.learning_rate,
                      "mlm_learning_rate": args.mlm_learning_rate}), flush=True)
    train_examples, test_examples = labelled.shakespeare_genre("train"), \
        labelled.shakespeare_genre("test")
    rows = [tfidf_row(train_examples, test_examples)]
    print(json.dumps(rows[-1]), flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as shared:
        tokenizer = shared_tokenizer(shared)
        for seed in seeds:
            config = functools.partial(small_config, args.steps, seed, tokenizer,
                                       args.learning_rate)
            with tempfile.TemporaryDirectory() as folder:
                rows.append(lmjax_row("lmjax encoder from scratch", config(),
                                      folder + "/scratch", test_examples))
                print(json.dumps(rows[-1]), flush=True)
                rows.append(peer_row(config(), folder + "/peer", test_examples))
                print(json.dumps(rows[-1]), flush=True)
                if args.mlm_steps:
                    pretrained = config()
                    pretrained.init_from = mlm_workdir(args.mlm_steps, seed, folder, tokenizer,
                                                       args.mlm_learning_rate)
                    rows.append(lmjax_row("lmjax encoder, masked-LM pretrained", pretrained,
                                          folder + "/pretrained", test_examples))
                    print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"total_wall_s": time.perf_counter() - start}), flush=True)
    print(_env.measured_with(env))
    print("\n| run | seeds | test accuracy | test macro-F1 | wall s | ms/step |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == name]

        def stat(key, digits=3):
            values = [r[key] for r in group if r[key] is not None]
            if not values:
                return "-"
            spread = statistics.pstdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"
        print(f"| {name} | {len(group)} | {stat('accuracy')} | {stat('macro_f1')} | "
              f"{stat('wall_s', 1)} | {stat('step_ms', 1)} |")


if __name__ == "__main__":
    main()
