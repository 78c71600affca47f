"""One module per paper algorithm; import the one you need (nothing is imported eagerly):

* :mod:`stablecore.methods.sharpness`, :mod:`stablecore.methods.stability`: Hessian trace,
  eigenvalues, Frobenius norm, eigen-density; SGD/GD linear-stability reports and monitors.
* :mod:`stablecore.methods.grokking`: modular-arithmetic grokking setup (StableMax, ⊥Grad).
* :mod:`stablecore.methods.colide`, :mod:`stablecore.methods.dag_utils`,
  :mod:`stablecore.methods.minimax`: CoLiDE DAG learning, DAG simulation/metrics, causal minimax.
* :mod:`stablecore.methods.feature_inheritance`: kept for old imports; A-SDM feature
  inheritance now lives in :mod:`stablecore.integrations.diffusers`.
* :mod:`stablecore.methods.counterfactual`: T-Rex robust counterfactual explanations.
* :mod:`stablecore.methods.graph_similarity`, :mod:`stablecore.methods.graph_attacks`: the
  tensor kernels and attacks behind STABLE (:mod:`stablecore.integrations.torch_geometric`).
"""
