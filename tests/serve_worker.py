"""The serving engine on one device and on an 8-device mesh (data 4, tensor 2), in a fresh process
(simulated CPU devices are fixed at JAX start-up). Prints one JSON line. Used by test_serve.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/serve_worker.py
"""
import json

import jax

from lmjax import serve, serve_batch, tokenizers
from lmjax.config import preset
from lmjax.model import init_params


def tokens(params, config, tokenizer, **mesh):
    engine = serve.Engine(params, config, tokenizer, slots=4, cache_len=16, **mesh)
    engine.start()  # one prefill bucket (16); prompt + new tokens fill the cache: it shifts
    prompts = ["ROMEO.", "To be", "a", "fox"]
    seqs = [serve.Sequence(list(p.encode()), 16 - len(p), lambda chunk: None,
                           temperature=t, top_k=k, seed=i)
            for i, p in enumerate(prompts) for t, k in ((0.0, 0), (1.0, 8))]
    engine.submit(seqs)
    assert engine.wait_until(lambda e: all(s.finish_reason for s in seqs), 300)
    sharded = not engine.batch.state["cache"][0]["k"].sharding.is_fully_replicated
    engine.stop()
    return [s.ids for s in seqs], sharded


def main():
    tokenizer = tokenizers.ByteTokenizer()
    config = preset("llama_tiny", vocab_size=tokenizer.vocab_size, embed_dim=32, mlp_dim=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, init_std=0.3, max_len=64)
    params = init_params(config, jax.random.key(0))
    single, _ = tokens(jax.device_put(params, jax.devices()[0]), config, tokenizer)
    sharded, mesh, rules = serve_batch.place_on_mesh(params, config, tensor=2)
    on_mesh, cache_sharded = tokens(sharded, config, tokenizer, mesh=mesh, rules=rules)
    print(json.dumps({"devices": jax.device_count(), "single": single, "mesh": on_mesh,
                      "cache_sharded": cache_sharded}))


if __name__ == "__main__":
    main()
