"""Training objectives of the encoder: masked LM (BERT) and sequence classification.

    objective = for_run(model_config, tokenizer)     # None for a decoder (causal LM)
    loss, metrics = objective.loss(params, batch, model_config, step_key, dropout_rng)

Shape letters: B batch, L length, W token-store row length (L - 2), V vocab size, N num_labels.

Causal LM stays in train.py (`loss_fn`, `eval_step`), untouched; `for_run(model_config,
tokenizer)` gives the objective of an encoder run (None for a decoder) and train.py's steps call
its `loss` (training: mean loss + metrics) and `eval_sums` (validation: sums that `finalize`
turns into metrics).

Masked LM (Devlin et al. 2019; transformers' DataCollatorForLanguageModeling): the rows are
BERT's, [CLS] piece [SEP] for each document piece of a token-store row (`add_special_tokens`);
each real, non-special token is selected with probability `mask_prob` (data.mlm_probability,
0.15), or with whole-word masking (data.whole_word_mask, google-research/bert's
--do_whole_word_mask) each word, its WordPiece '##' pieces going with it; a selected token
becomes [MASK] with probability 0.8, a uniformly random token with 0.1, and stays with 0.1; the
loss is the cross-entropy at the selected tokens only. The masks are drawn inside the jitted
step from `fold_in(fold_in(fold_in(state.rng, step), MASK_STREAM), row)`: the run's seed, the
step and the row of the global batch, so a resumed run draws exactly the masks an
uninterrupted one would, and the 8-device mesh the same as one device. Validation rows are masked with a key from
their tokens alone, so every evaluation scores the same masks.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax import encoder as encoder_lib
from lmjax import wordpiece
from lmjax.config import ModelConfig

MASK_STREAM = 0x6D6C6D  # folded into the step's key: masks never share dropout's stream


def _row_keys(key: jax.Array, num_rows: int) -> jax.Array:
    return jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(num_rows))


def mask_tokens(keys_B: jax.Array, tokens_BxL: jax.Array, maskable_BxL: jax.Array,
                mask_id: int, vocab_size: int, mask_prob: float = 0.15,
                word_heads_BxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """BERT's masking, one key per row: (inputs_BxL with the selected tokens replaced,
    selected_BxL bool). word_heads_BxL (whole-word masking, `word_heads`): each token takes the
    selection draw of its word's first token, so a word is selected or not as a whole; the
    80/10/10 replacement stays per token (google-research/bert, transformers'
    DataCollatorForWholeWordMask)."""
    def row(key, tokens_L, maskable_L, heads_L):
        select_key, how_key, random_key = jax.random.split(key, 3)
        L = tokens_L.shape[0]
        draw_L = jax.random.uniform(select_key, (L,))
        if heads_L is not None:
            draw_L = draw_L[heads_L]
        selected_L = (draw_L < mask_prob) & maskable_L
        how_L = jax.random.uniform(how_key, (L,))
        random_L = jax.random.randint(random_key, (L,), 0, vocab_size, tokens_L.dtype)
        replaced_L = jnp.where(how_L < 0.8, mask_id, jnp.where(how_L < 0.9, random_L, tokens_L))
        return jnp.where(selected_L, replaced_L, tokens_L), selected_L
    return jax.vmap(row)(keys_B, tokens_BxL, maskable_BxL, word_heads_BxL)


def word_heads(tokens_BxL: jax.Array, maskable_BxL: jax.Array,
               continuation_ids: tuple[int, ...]) -> jax.Array:
    """int32[B, L]: the index of the first token of each token's word. A continuation piece
    (WordPiece '##...') belongs to the word of the token before it when that one is maskable;
    after a special token or padding (a row that starts inside a word) it starts a word."""
    L = tokens_BxL.shape[1]
    n = max(continuation_ids, default=0) + 1  # a lookup table, not an isin over the vocab
    table_N = jnp.zeros((n,), bool).at[jnp.asarray(continuation_ids, jnp.int32)].set(True)
    continuation_BxL = table_N[jnp.clip(tokens_BxL, 0, n - 1)] & (tokens_BxL < n)
    after_maskable_BxL = jnp.pad(maskable_BxL[:, :-1], ((0, 0), (1, 0)))
    starts_BxL = ~(continuation_BxL & maskable_BxL & after_maskable_BxL)
    return jax.lax.cummax(jnp.where(starts_BxL, jnp.arange(L, dtype=jnp.int32), 0), axis=1)


def add_special_tokens(tokens_BxW: jax.Array, segment_ids_BxW: jax.Array, cls_id: int,
                       sep_id: int, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """BERT's rows from token-store rows: each document piece of a row (a run of one segment id
    > 0) becomes [CLS] piece [SEP], in a row two tokens longer (L = W + 2). A row of one piece
    (nanoGPT-style stream rows, a long document) fits exactly; each further piece takes two more
    slots, so the row's last tokens are dropped and its last piece still ends with [SEP].
    Returns (tokens_BxL, segment_ids_BxL), padding with segment id 0."""
    def row(tokens_W, segments_W):
        W = tokens_W.shape[0]
        L = W + 2
        real_W = segments_W > 0
        previous_W = jnp.pad(segments_W[:-1], (1, 0))
        following_W = jnp.pad(segments_W[1:], (0, 1))
        starts_W = real_W & (segments_W != previous_W)
        ends_W = real_W & (segments_W != following_W)
        piece_W = jnp.cumsum(starts_W)  # 1, 2, .. for the tokens of the row's pieces
        at_W = jnp.arange(W) + 2 * piece_W - 1  # the slot of each token after the inserts
        drop = lambda keep_W, at: jnp.where(keep_W, at, L)  # index L: dropped by the scatter
        out_L = jnp.full((L,), pad_id, tokens_W.dtype)
        out_L = out_L.at[drop(real_W, at_W)].set(tokens_W, mode="drop")
        out_L = out_L.at[drop(starts_W, at_W - 1)].set(cls_id, mode="drop")
        out_L = out_L.at[drop(ends_W, at_W + 1)].set(sep_id, mode="drop")
        seg_L = jnp.zeros((L,), segments_W.dtype)
        for keep_W, shift in ((real_W, 0), (starts_W, -1), (ends_W, 1)):
            seg_L = seg_L.at[drop(keep_W, at_W + shift)].set(segments_W, mode="drop")
        # A piece cut at the row's end ends with [SEP] too.
        out_L = out_L.at[L - 1].set(jnp.where(seg_L[L - 1] > 0, sep_id, out_L[L - 1]))
        return out_L, seg_L
    return jax.vmap(row)(tokens_BxW, segment_ids_BxW)


@dataclasses.dataclass(frozen=True)
class MaskedLM:
    """Masked-LM pretraining of an encoder with head 'lm' on token-store batches: each row's
    document pieces as [CLS] piece [SEP] (`add_special_tokens`: the store's rows are
    data.seq_len - 2 tokens long, so the model sees rows of data.seq_len), attention within each
    piece. `continuation_ids` (whole-word masking): the vocabulary's '##' pieces."""

    mask_id: int
    special_ids: tuple[int, ...]
    cls_id: int
    sep_id: int
    mask_prob: float = 0.15
    continuation_ids: tuple[int, ...] = ()
    whole_word: bool = False
    pad_id: int = 0

    def rows(self, batch) -> tuple[jax.Array, jax.Array]:
        """(tokens_BxL, segment_ids_BxL) of a token-store batch, as BERT's rows."""
        segments_BxW = (batch["segment_ids"] if "segment_ids" in batch
                        else (batch["mask"] > 0).astype(jnp.int32))
        return add_special_tokens(batch["inputs"], segments_BxW, self.cls_id, self.sep_id,
                                  self.pad_id)

    def mask(self, tokens_BxL, segment_ids_BxL, keys_B, vocab_size: int):
        """(inputs_BxL, selected_BxL) of BERT's rows: special tokens and padding never
        selected; whole words when `whole_word`."""
        maskable_BxL = (segment_ids_BxL > 0) & ~jnp.isin(tokens_BxL, jnp.asarray(
            self.special_ids, tokens_BxL.dtype))
        heads_BxL = (word_heads(tokens_BxL, maskable_BxL, self.continuation_ids)
                     if self.whole_word else None)
        return mask_tokens(keys_B, tokens_BxL, maskable_BxL, self.mask_id, vocab_size,
                           self.mask_prob, heads_BxL)

    def _sums(self, params, config, batch, keys_B, dropout_rng):
        tokens_BxL, segment_ids_BxL = self.rows(batch)
        inputs_BxL, selected_BxL = self.mask(tokens_BxL, segment_ids_BxL, keys_B,
                                             config.vocab_size)
        logits_BxLxV = encoder_lib.Encoder(config).apply(
            {"params": params}, inputs_BxL, segment_ids_BxL=segment_ids_BxL,
            deterministic=dropout_rng is None,
            rngs=None if dropout_rng is None else {"dropout": dropout_rng})
        losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, tokens_BxL)
        weight_BxL = selected_BxL.astype(jnp.float32)
        correct_BxL = (jnp.argmax(logits_BxLxV, -1) == tokens_BxL) * weight_BxL
        return jnp.sum(losses_BxL * weight_BxL), jnp.sum(weight_BxL), jnp.sum(correct_BxL)

    def loss(self, params, batch, config: ModelConfig, step_key: jax.Array,
             dropout_rng: jax.Array | None = None):
        """(mean loss over the selected tokens, {'mlm_accuracy'}) of a training batch; the
        masks come from `step_key` (= fold_in(state.rng, step)) and the row."""
        keys_B = _row_keys(jax.random.fold_in(step_key, MASK_STREAM), batch["inputs"].shape[0])
        loss_sum, count, correct = self._sums(params, config, batch, keys_B, dropout_rng)
        count = jnp.maximum(count, 1.0)
        return loss_sum / count, {"mlm_accuracy": correct / count}

    def eval_sums(self, params, batch, config: ModelConfig):
        """(loss sum, selected tokens, {'correct'}) of a validation batch, masked with keys from
        each row's tokens (the same masks at every evaluation)."""
        tokens_BxW = batch["inputs"]
        weights_W = jnp.arange(1, tokens_BxW.shape[1] + 1, dtype=jnp.uint32)
        digest_B = jnp.sum(tokens_BxW.astype(jnp.uint32) * weights_W * jnp.uint32(2654435761),
                           axis=1)
        keys_B = jax.vmap(lambda d: jax.random.fold_in(jax.random.key(MASK_STREAM), d))(digest_B)
        loss_sum, count, correct = self._sums(params, config, batch, keys_B, None)
        return loss_sum, count, {"correct": correct}

    @staticmethod
    def finalize(sums: dict, count: float) -> dict:
        """The validation metrics from the summed `eval_sums` extras."""
        return {"mlm_accuracy": float(sums["correct"]) / max(count, 1.0)}


def confusion_metrics(confusion_NxN) -> dict:
    """accuracy, macro-F1 (the unweighted mean of the per-class F1, 0 for a class never
    predicted nor present, as scikit-learn's zero_division=0) and the confusion matrix (rows:
    true labels, columns: predictions) as a list of lists."""
    c = np.asarray(confusion_NxN, np.float64)
    tp, predicted, actual = np.diag(c), c.sum(0), c.sum(1)
    denominator = predicted + actual
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return {"accuracy": float(tp.sum() / max(c.sum(), 1.0)), "macro_f1": float(f1.mean()),
            "confusion": c.astype(np.int64).tolist()}


@dataclasses.dataclass(frozen=True)
class Classification:
    """Sequence classification (head 'classifier') on `labelled.py` batches: cross-entropy
    (optionally class-weighted, weighted mean as torch's CrossEntropyLoss(weight=...)); with
    num_labels == 1, regression with the mean squared error (BertForSequenceClassification)."""

    num_labels: int
    class_weights: tuple[float, ...] = ()

    def _losses(self, params, batch, config, dropout_rng):
        logits_BxN = encoder_lib.Encoder(config).apply(
            {"params": params}, batch["inputs"], attention_mask=batch["mask"] > 0,
            token_types_BxL=batch["token_types"], deterministic=dropout_rng is None,
            rngs=None if dropout_rng is None else {"dropout": dropout_rng})
        weight_B, labels_B = batch["weight"][:, 0], batch["labels"][:, 0]
        if self.num_labels == 1:
            return (logits_BxN[:, 0] - labels_B) ** 2, weight_B, logits_BxN, labels_B
        labels_B = labels_B.astype(jnp.int32)
        losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxN, labels_B)
        if self.class_weights:
            weight_B = weight_B * jnp.asarray(self.class_weights, jnp.float32)[labels_B]
        return losses_B, weight_B, logits_BxN, labels_B

    def loss(self, params, batch, config: ModelConfig, step_key: jax.Array,
             dropout_rng: jax.Array | None = None):
        """(mean loss, {'accuracy'}) of a training batch."""
        del step_key
        losses_B, weight_B, logits_BxN, labels_B = self._losses(params, batch, config,
                                                                dropout_rng)
        loss = jnp.sum(losses_B * weight_B) / jnp.maximum(jnp.sum(weight_B), 1e-9)
        if self.num_labels == 1:
            return loss, {}
        real_B = batch["weight"][:, 0]
        correct = jnp.sum((jnp.argmax(logits_BxN, -1) == labels_B) * real_B)
        return loss, {"accuracy": correct / jnp.maximum(jnp.sum(real_B), 1.0)}

    def eval_sums(self, params, batch, config: ModelConfig):
        """(loss sum, examples, {'confusion' [N, N]}) of a validation batch (unweighted)."""
        losses_B, _, logits_BxN, labels_B = self._losses(params, batch, config, None)
        real_B = batch["weight"][:, 0]
        if self.num_labels == 1:
            return jnp.sum(losses_B * real_B), jnp.sum(real_B), {}
        N = self.num_labels
        truth_BxN = jax.nn.one_hot(labels_B, N) * real_B[:, None]
        confusion_NxN = truth_BxN.T @ jax.nn.one_hot(jnp.argmax(logits_BxN, -1), N)
        return jnp.sum(losses_B * real_B), jnp.sum(real_B), {"confusion": confusion_NxN}

    def finalize(self, sums: dict, count: float) -> dict:
        if self.num_labels == 1:
            return {}
        return confusion_metrics(sums["confusion"])


def for_run(config: ModelConfig, tokenizer, class_weights: tuple[float, ...] = (),
            mlm_probability: float = 0.15, whole_word_mask: bool = False):
    """The objective of a run: None (train.py's causal LM) for a decoder, `MaskedLM` for an
    encoder with head 'lm' (its tokenizer must have [MASK], [CLS] and [SEP] tokens, and for
    whole-word masking WordPiece's '##' pieces), `Classification` for head 'classifier'."""
    if config.architecture != "encoder":
        return None
    if config.head == "classifier":
        if class_weights and len(class_weights) != config.num_labels:
            raise ValueError(f"data.class_weights has {len(class_weights)} weights for "
                             f"model.num_labels={config.num_labels}")
        return Classification(config.num_labels, tuple(class_weights))
    if config.head != "lm":
        raise ValueError(f"model.head={config.head!r}: train_and_evaluate trains encoders with "
                         "model.head='lm' (masked LM) or 'classifier'")
    backend = getattr(tokenizer, "backend", None)
    if not hasattr(backend, "token_to_id"):
        raise ValueError(f"masked-LM pretraining needs a tokenizer with [MASK], [CLS] and [SEP] "
                         f"tokens; the {tokenizer.kind!r} tokenizer has none: use tokenizer.kind="
                         "'wordpiece' or an HF BERT folder (tokenizer.kind='hf')")
    try:
        mask_id, cls_id, sep_id = (wordpiece.token_id(tokenizer, n) for n in ("mask", "cls", "sep"))
    except ValueError as e:
        raise ValueError(f"masked-LM pretraining: {e} (use tokenizer.kind='wordpiece' or an HF "
                         "BERT folder, tokenizer.kind='hf')") from None
    continuation = ()
    if whole_word_mask:
        model = backend.model
        prefix = getattr(model, "continuing_subword_prefix", None)
        if type(model).__name__ != "WordPiece" or not prefix:
            raise ValueError("data.whole_word_mask=True needs a WordPiece tokenizer (its '##' "
                             f"pieces mark words); this one is {type(model).__name__}")
        continuation = tuple(sorted(i for t, i in backend.get_vocab().items()
                                    if t.startswith(prefix)))
    specials = tuple(wordpiece.special_ids(tokenizer)) or (mask_id, cls_id, sep_id)
    return MaskedLM(mask_id=mask_id, special_ids=specials, cls_id=cls_id, sep_id=sep_id,
                    mask_prob=mlm_probability, continuation_ids=continuation,
                    whole_word=whole_word_mask, pad_id=tokenizer.pad_id or 0)
