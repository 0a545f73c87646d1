"""The language-model study built on eqx_gn: data, model, training."""

from ._data import (
    AbstractTokenizer as AbstractTokenizer,
    BPETokenizer as BPETokenizer,
    ByteTokenizer as ByteTokenizer,
    TokenSplits as TokenSplits,
    TokenWindows as TokenWindows,
    batch_iterator as batch_iterator,
    corpus_hash as corpus_hash,
    default_cache_dir as default_cache_dir,
    inputs_and_targets as inputs_and_targets,
    load_corpus as load_corpus,
    load_shakespeare as load_shakespeare,
    load_text as load_text,
    make_tokenizer as make_tokenizer,
    prepare_splits as prepare_splits,
    shakespeare_paths as shakespeare_paths,
    split_documents as split_documents,
    strip_play_markdown as strip_play_markdown,
    tokenize_to_file as tokenize_to_file,
    window_dataset as window_dataset,
)
from ._model import (
    CONFIGS as CONFIGS,
    MLP as MLP,
    Attention as Attention,
    Embedding as Embedding,
    Linear as Linear,
    LMConfig as LMConfig,
    RMSNorm as RMSNorm,
    Transformer as Transformer,
    TransformerBlock as TransformerBlock,
    apply_lm as apply_lm,
    apply_rope as apply_rope,
    count_params as count_params,
    embedding_and_head as embedding_and_head,
    get_config as get_config,
    layerwise_blocks as layerwise_blocks,
)
from ._plot import (
    load_metrics as load_metrics,
    plot_runs as plot_runs,
)
from ._train import (
    DEFAULT_LEARNING_RATES as DEFAULT_LEARNING_RATES,
    GN_OPTIMIZERS as GN_OPTIMIZERS,
    OPTIMIZERS as OPTIMIZERS,
    ConfigError as ConfigError,
    TrainConfig as TrainConfig,
    train as train,
)
