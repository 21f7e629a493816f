"""Training objectives of the encoder: masked LM (BERT) and sequence classification.

    objective = for_run(model_config, tokenizer)     # None for a decoder (causal LM)
    loss, metrics = objective.loss(params, batch, model_config, step_key, dropout_rng)

Shape letters: B batch, L length, V vocab size, N num_labels.

Causal LM stays in train.py (`loss_fn`, `eval_step`), untouched; `for_run(model_config,
tokenizer)` gives the objective of an encoder run (None for a decoder) and train.py's steps call
its `loss` (training: mean loss + metrics) and `eval_sums` (validation: sums that `finalize`
turns into metrics).

Masked LM (Devlin et al. 2019; transformers' DataCollatorForLanguageModeling): each real,
non-special token is selected with probability `mask_prob` (0.15); a selected token becomes
[MASK] with probability 0.8, a uniformly random token with 0.1, and stays with 0.1; the loss is
the cross-entropy at the selected tokens only. The masks are drawn inside the jitted step from
`fold_in(fold_in(fold_in(state.rng, step), MASK_STREAM), row)`: the run's seed, the step and
the row of the global batch, so a resumed run draws exactly the masks an uninterrupted one
would, and the 8-device mesh the same as one device. Validation rows are masked with a key from
their tokens alone, so every evaluation scores the same masks.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax import encoder as encoder_lib
from lmjax.config import ModelConfig

MASK_STREAM = 0x6D6C6D  # folded into the step's key: masks never share dropout's stream


def real_tokens(batch) -> jax.Array:
    """bool[B, L]: the tokens of a batch that are not padding (segment id > 0 for packed rows,
    else the loss mask)."""
    if "segment_ids" in batch:
        return batch["segment_ids"] > 0
    return batch["mask"] > 0


def _row_keys(key: jax.Array, num_rows: int) -> jax.Array:
    return jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(num_rows))


def mask_tokens(keys_B: jax.Array, tokens_BxL: jax.Array, maskable_BxL: jax.Array,
                mask_id: int, vocab_size: int, mask_prob: float = 0.15
                ) -> tuple[jax.Array, jax.Array]:
    """BERT's masking, one key per row: (inputs_BxL with the selected tokens replaced,
    selected_BxL bool)."""
    def row(key, tokens_L, maskable_L):
        select_key, how_key, random_key = jax.random.split(key, 3)
        L = tokens_L.shape[0]
        selected_L = (jax.random.uniform(select_key, (L,)) < mask_prob) & maskable_L
        how_L = jax.random.uniform(how_key, (L,))
        random_L = jax.random.randint(random_key, (L,), 0, vocab_size, tokens_L.dtype)
        replaced_L = jnp.where(how_L < 0.8, mask_id, jnp.where(how_L < 0.9, random_L, tokens_L))
        return jnp.where(selected_L, replaced_L, tokens_L), selected_L
    return jax.vmap(row)(keys_B, tokens_BxL, maskable_BxL)


def _packed(batch) -> dict:
    if "segment_ids" not in batch:
        return {"attention_mask": batch["mask"] > 0}
    return {"segment_ids_BxL": batch["segment_ids"], "positions_BxL": batch["positions"]}


@dataclasses.dataclass(frozen=True)
class MaskedLM:
    """Masked-LM pretraining of an encoder with head 'lm' on token-store batches (the rows'
    `inputs`; packed documents attend only within themselves)."""

    mask_id: int
    special_ids: tuple[int, ...]
    mask_prob: float = 0.15

    def _masked(self, batch, keys_B, config: ModelConfig):
        tokens_BxL = batch["inputs"]
        maskable_BxL = real_tokens(batch) & ~jnp.isin(tokens_BxL, jnp.asarray(self.special_ids))
        inputs_BxL, selected_BxL = mask_tokens(keys_B, tokens_BxL, maskable_BxL, self.mask_id,
                                               config.vocab_size, self.mask_prob)
        return tokens_BxL, inputs_BxL, selected_BxL

    def _sums(self, params, config, tokens_BxL, inputs_BxL, selected_BxL, batch, dropout_rng):
        logits_BxLxV = encoder_lib.Encoder(config).apply(
            {"params": params}, inputs_BxL, deterministic=dropout_rng is None,
            rngs=None if dropout_rng is None else {"dropout": dropout_rng}, **_packed(batch))
        losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, tokens_BxL)
        weight_BxL = selected_BxL.astype(jnp.float32)
        correct_BxL = (jnp.argmax(logits_BxLxV, -1) == tokens_BxL) * weight_BxL
        return jnp.sum(losses_BxL * weight_BxL), jnp.sum(weight_BxL), jnp.sum(correct_BxL)

    def loss(self, params, batch, config: ModelConfig, step_key: jax.Array,
             dropout_rng: jax.Array | None = None):
        """(mean loss over the selected tokens, {'mlm_accuracy'}) of a training batch; the
        masks come from `step_key` (= fold_in(state.rng, step)) and the row."""
        keys_B = _row_keys(jax.random.fold_in(step_key, MASK_STREAM), batch["inputs"].shape[0])
        tokens, inputs, selected = self._masked(batch, keys_B, config)
        loss_sum, count, correct = self._sums(params, config, tokens, inputs, selected, batch,
                                              dropout_rng)
        count = jnp.maximum(count, 1.0)
        return loss_sum / count, {"mlm_accuracy": correct / count}

    def eval_sums(self, params, batch, config: ModelConfig):
        """(loss sum, selected tokens, {'correct'}) of a validation batch, masked with keys from
        each row's tokens (the same masks at every evaluation)."""
        tokens_BxL = batch["inputs"]
        weights_L = jnp.arange(1, tokens_BxL.shape[1] + 1, dtype=jnp.uint32)
        digest_B = jnp.sum(tokens_BxL.astype(jnp.uint32) * weights_L * jnp.uint32(2654435761),
                           axis=1)
        keys_B = jax.vmap(lambda d: jax.random.fold_in(jax.random.key(MASK_STREAM), d))(digest_B)
        tokens, inputs, selected = self._masked(batch, keys_B, config)
        loss_sum, count, correct = self._sums(params, config, tokens, inputs, selected, batch,
                                              None)
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


def for_run(config: ModelConfig, tokenizer, class_weights: tuple[float, ...] = ()):
    """The objective of a run: None (train.py's causal LM) for a decoder, `MaskedLM` for an
    encoder with head 'lm' (its tokenizer must have a [MASK] token), `Classification` for
    head 'classifier'."""
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
    from_config = getattr(tokenizer, "config", {}) or {}
    mask_token = from_config.get("mask_token", "[MASK]")
    if isinstance(mask_token, dict):
        mask_token = mask_token.get("content")
    backend = getattr(tokenizer, "backend", None)
    mask_id = backend.token_to_id(mask_token) if hasattr(backend, "token_to_id") else None
    if mask_id is None:
        raise ValueError(f"masked-LM pretraining needs a tokenizer with a [MASK] token; the "
                         f"{tokenizer.kind!r} tokenizer has none: use tokenizer.kind='wordpiece' "
                         "or an HF BERT folder (tokenizer.kind='hf')")
    specials = tuple(sorted(i for i, t in backend.get_added_tokens_decoder().items() if t.special))
    return MaskedLM(mask_id=mask_id, special_ids=specials or (mask_id,))
