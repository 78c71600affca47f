"""T-Rex: counterfactual explanations that stay valid when the model is retrained.

Hamman et al., "Robust Counterfactual Explanations for Neural Networks With Probabilistic
Guarantees", ICML 2023 (arXiv:2305.11997). The stability of a counterfactual ``x`` for a model
``m`` (``m(x)`` = probability of the counterfactual class) is estimated with K Gaussian draws
``x_i ~ N(x, sigma^2 I)`` as (the practical form of the official code)::

    R(x) = mean_i m(x_i) - mean_i |m(x) - m(x_i)|

:func:`stability` evaluates it for B points and K draws in ONE forward pass of ``B * (K + 1)`` rows
(the per-draw loop of public implementations, :func:`stability_loop`, is the reference and the
benchmark peer). :func:`trex_i` raises R above ``tau`` by normalised gradient ascent inside an
L2 ball around a base counterfactual; :func:`trex_nn` picks the nearest training point whose R
exceeds ``tau``. :func:`closest_counterfactual` (elastic-net attack, EAD-like) is the non-robust
base. Metrics: :func:`cost`, :func:`validity` (under retrained models, see :func:`fit_classifier`)
and :func:`lof` (local outlier factor, no scikit-learn needed).

Model contract: ``model(x: [N, d]) -> [N, C]`` logits (softmax) or ``[N]``/``[N, 1]`` one logit
(sigmoid, class 1); ``output="probs"`` if it already returns probabilities. Rows must be
independent (put BatchNorm/Dropout models in ``eval()`` mode).

Example::

    >>> import torch
    >>> from stablecore.methods.counterfactual import closest_counterfactual, trex_i
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> x = torch.rand(8, 4)
    >>> base = closest_counterfactual(net, x, target=1)
    >>> robust = trex_i(net, base.x_cf, target=1, tau=0.6, k=200)
    >>> robust.x_cf.shape, robust.stability.shape
    (torch.Size([8, 4]), torch.Size([8]))
"""

from __future__ import annotations

# The implementation lives in ``stablecore.methods._counterfactual`` (common pieces, stability,
# searches, metrics); this module is the public face and keeps the original import paths.
from ._counterfactual._common import Counterfactuals, class_probability, predict
from ._counterfactual._common import Model as Model  # the model-contract type alias
from ._counterfactual.metrics import cost, fit_classifier, lof, lof_inlier, make_mlp, validity
from ._counterfactual.search import (
    closest_counterfactual,
    nearest_counterfactual,
    trex_i,
    trex_nn,
)
from ._counterfactual.stability import stability, stability_loop

__all__ = [
    "Counterfactuals",
    "class_probability",
    "closest_counterfactual",
    "cost",
    "fit_classifier",
    "lof",
    "lof_inlier",
    "make_mlp",
    "nearest_counterfactual",
    "predict",
    "stability",
    "stability_loop",
    "trex_i",
    "trex_nn",
    "validity",
]
