"""The loss every phase minimises, and the first-order optimizers as the runner
builds them (the baselines, and GN's inner optimizers)."""

import optax

from ... import SoftmaxCrossEntropy, muon_adamw
from ...baselines import shampoo, soap
from .._model import Transformer, embedding_and_head

#: The loss every phase minimises: next-token cross-entropy. Its labels are token
#: ids, checked against the vocabulary once on the host (`TokenSplits.check_ids`),
#: so the traced steps carry no label check: a step with one holds a host callback,
#: which JAX's persistent compilation cache does not store.
LM_LOSS = SoftmaxCrossEntropy(check_labels=False)


def first_order(
    optimizer: str,
    learning_rate: float | optax.Schedule,
    model: Transformer,
    b2: float,
    weight_decay: float,
    max_grad_norm: float,
) -> optax.GradientTransformation:
    """AdamW, Muon, SOAP, Shampoo or PSGD-Kron as the study trains them, each
    update clipped to global norm ``max_grad_norm`` first (Muon:
    `eqx_gn.muon_adamw`, AdamW on the embedding, the head and the 1-D parameters;
    Shampoo with Adam grafting and momentum 0.9; PSGD-Kron with momentum 0.9)."""
    if optimizer == "muon":
        return muon_adamw(
            learning_rate,
            adam_filter=embedding_and_head(model),
            adam_b2=b2,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
        )
    if optimizer == "adamw":
        inner = optax.adamw(learning_rate, b1=0.9, b2=b2, weight_decay=weight_decay)
    elif optimizer == "soap":
        inner = soap(learning_rate, weight_decay=weight_decay)
    elif optimizer == "shampoo":
        inner = shampoo(learning_rate, b1=0.9, b2=b2, weight_decay=weight_decay)
    elif optimizer == "psgd":
        import psgdax

        inner = psgdax.kron(learning_rate, b1=0.9, weight_decay=weight_decay)
    else:  # pragma: no cover - guarded by the settings' checks
        raise AssertionError(optimizer)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), inner)
