"""Evaluation of frozen backbones: linear probe (CLIP protocol, L-BFGS) and kNN on cached features."""
from mlcd.eval.evaluate import evaluate, probe_features
from mlcd.eval.knn import knn_predict
from mlcd.eval.linear_probe import fit_logreg, search_lam

__all__ = ["evaluate", "probe_features", "knn_predict", "fit_logreg", "search_lam"]
