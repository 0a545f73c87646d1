import equinox as eqx
import jax
import numpy as np

import eqx_gn
from eqx_gn import lm

splits = lm.prepare_splits(tokenizer="byte")  # Shakespeare by play, cached
config = lm.get_config("tiny")  # byte-level, width 64, 2 layers, context 64
model = lm.Transformer(config, jax.random.key(0))
K, B = 8, 16  # 8 micro-batches of 16 sequences per outer step
it = lm.batch_iterator(splits.train, batch_size=B, seq_len=config.seq_len, seed=0)


def micro_batches(k):  # k batches stacked: ((k, B, seq), (k, B, seq))
    x, y = zip(*(lm.inputs_and_targets(next(it)) for _ in range(k)), strict=True)
    return np.stack(x), np.stack(y)


gn = eqx_gn.GaussNewton(
    lm.apply_lm,
    eqx_gn.SoftmaxCrossEntropy(),
    solver=eqx_gn.InnerOptimizer(
        learning_rate=3e-2,
        schedule="global_cosine",  # one cosine over the run
        total_steps=10,
        adam_filter=lm.embedding_and_head(model),  # AdamW; Muon elsewhere
    ),
    blocks=lm.layerwise_blocks(model),  # None: full GN
)
state = gn.init(model)
step = eqx.filter_jit(gn.step)
for t in range(10):
    model, state, stats = step(model, state, micro_batches(K), micro_batches(2))
    print(t, float(stats.loss_before), float(stats.loss_after))
