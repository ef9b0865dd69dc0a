"""Hyper-parameter tuning of scikit-learn classifiers, scored by cross-validation (maximise).

scikit-learn is imported on first use, and each dataset is loaded once per process and kept out of
the pickled problem, so problems stay cheap to build and to ship to Dask workers. ``version`` is a
hash of everything that decides a score besides the candidate (dataset contents, estimator, fixed
params, CV, scoring, seed, scikit-learn version), so a change to any of them invalidates caches.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from engine.core.evaluation import Evaluation
from engine.core.problem import Direction
from engine.core.space import Choice, Dimension, Float, Int
from engine.problems.loader import BuiltFromParams, param_error

__all__ = [
    "DATASETS",
    "GradientBoostingTuning",
    "RandomForestTuning",
    "SVCTuning",
    "SklearnTuning",
    "dataset_checksum",
    "load_dataset",
]

DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "wine")
MAX_CV = 20


@functools.cache
def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` of a bundled scikit-learn dataset, loaded once per process and read-only."""
    if name not in DATASETS:
        raise param_error("sklearn", "dataset", name, f"one of {', '.join(DATASETS)}")
    datasets = importlib.import_module("sklearn.datasets")
    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    x, y = np.ascontiguousarray(x, dtype=np.float64), np.ascontiguousarray(y)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


@functools.cache
def dataset_checksum(name: str) -> str:
    """A hash of the dataset's shapes, dtypes and bytes."""
    x, y = load_dataset(name)
    h = hashlib.blake2b(digest_size=16)
    for a in (x, y):
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class SklearnTuning(BuiltFromParams):
    """Base of the tuning problems: cross-validated ``scoring`` of an estimator on a dataset."""

    name: ClassVar[str] = "sklearn"
    estimator_path: ClassVar[str] = ""
    fixed_params: ClassVar[Mapping[str, Any]] = {}
    scaler_path: ClassVar[str] = ""
    uses_random_state: ClassVar[bool] = True
    space: Mapping[str, Dimension] = {}
    direction: Direction = "maximize"

    def __init__(
        self,
        *,
        dataset: str = "digits",
        cv: int = 3,
        scoring: str = "accuracy",
        seed: int = 0,
        version: str = "",
    ) -> None:
        if dataset not in DATASETS:
            raise param_error(self.name, "dataset", dataset, f"one of {', '.join(DATASETS)}")
        if isinstance(cv, bool) or not isinstance(cv, int) or not 2 <= cv <= MAX_CV:
            raise param_error(self.name, "cv", cv, f"an integer number of folds from 2 to {MAX_CV}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise param_error(self.name, "seed", seed, "an integer from 0 to 2**32 - 1")
        if not isinstance(version, str):
            raise param_error(self.name, "version", version, "a string")
        if not isinstance(scoring, str) or scoring not in _scorer_names():
            raise param_error(
                self.name,
                "scoring",
                scoring,
                "a scikit-learn scorer name such as accuracy, f1_macro, roc_auc_ovr",
            )
        self.dataset = dataset
        self.cv = cv
        self.scoring = scoring
        self.seed = seed
        self.user_version = version
        self._version: str | None = None

    @property
    def params(self) -> dict[str, Any]:
        """The constructor parameters, enough to rebuild this problem."""
        return {
            "dataset": self.dataset,
            "cv": self.cv,
            "scoring": self.scoring,
            "seed": self.seed,
            "version": self.user_version,
        }

    @property
    def version(self) -> str:
        """The user's ``version`` (if any), a dash, and a hash of what decides a score."""
        if self._version is None:
            import sklearn

            x, y = load_dataset(self.dataset)
            facts = {
                "dataset": self.dataset,
                "shape": [list(x.shape), list(y.shape)],
                "checksum": dataset_checksum(self.dataset),
                "estimator": self.estimator_path,
                "scaler": self.scaler_path,
                "fixed": dict(self.fixed_params),
                "cv": self.cv,
                "scoring": self.scoring,
                "seed": self.seed,
                "sklearn": sklearn.__version__,
            }
            blob = json.dumps(facts, sort_keys=True, default=repr).encode()
            digest = hashlib.blake2b(blob, digest_size=6).hexdigest()
            self._version = f"{self.user_version}-{digest}" if self.user_version else digest
        return self._version

    def estimator_params(self, candidate: Mapping[str, Any]) -> dict[str, Any]:
        """The candidate's values, typed as their dimensions say, plus the fixed params."""
        params: dict[str, Any] = dict(self.fixed_params)
        for key, dim in self.space.items():
            value = candidate[key]
            if isinstance(dim, Int):
                value = int(value)
            elif isinstance(dim, Float):
                value = float(value)
            params[key] = value
        if self.uses_random_state:
            params["random_state"] = self.seed
        return params

    def estimator(self, candidate: Mapping[str, Any]) -> Any:
        """A fresh, unfitted estimator for ``candidate`` (after ``scaler_path``'s scaler, if set)."""
        estimator = _import(self.estimator_path)(**self.estimator_params(candidate))
        if not self.scaler_path:
            return estimator
        from sklearn.pipeline import make_pipeline

        return make_pipeline(_import(self.scaler_path)(), estimator)

    def evaluate(self, candidate: Mapping[str, Any]) -> Evaluation:
        """Mean ``cv``-fold score of the candidate's estimator, with ``cv_std`` and ``fit_seconds``.

        ``fit_seconds`` is the total fit time over the folds. Runs single-threaded (n_jobs=1, one
        OpenMP/BLAS thread) so that many evaluations can share a machine.
        """
        from sklearn.model_selection import StratifiedKFold, cross_validate
        from threadpoolctl import threadpool_limits

        x, y = load_dataset(self.dataset)
        splitter = StratifiedKFold(n_splits=self.cv, shuffle=True, random_state=self.seed)
        with threadpool_limits(limits=1):
            result = cross_validate(
                self.estimator(candidate),
                x,
                y,
                cv=splitter,
                scoring=self.scoring,
                n_jobs=1,
                error_score="raise",
            )
        scores = np.asarray(result["test_score"], dtype=np.float64)
        return Evaluation(
            score=float(scores.mean()),
            metrics={"cv_std": float(scores.std()), "fit_seconds": float(np.sum(result["fit_time"]))},
        )


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@functools.lru_cache(maxsize=1)
def _scorer_names() -> frozenset[str]:
    metrics = importlib.import_module("sklearn.metrics")
    return frozenset(metrics.get_scorer_names())


class GradientBoostingTuning(SklearnTuning):
    """HistGradientBoostingClassifier (no early stopping): learning rate, size and regularisation."""

    name = "gradient_boosting"
    estimator_path = "sklearn.ensemble:HistGradientBoostingClassifier"
    fixed_params: ClassVar[Mapping[str, Any]] = {"early_stopping": False}
    space: Mapping[str, Dimension] = {
        "learning_rate": Float(1e-3, 0.5, log=True),
        "max_iter": Int(10, 50, log=True),
        "max_leaf_nodes": Int(4, 32, log=True),
        "max_depth": Int(2, 8),
        "min_samples_leaf": Int(1, 50),
        "l2_regularization": Float(1e-6, 1.0, log=True),
    }


class RandomForestTuning(SklearnTuning):
    """RandomForestClassifier (n_jobs=1): number and shape of the trees."""

    name = "random_forest"
    estimator_path = "sklearn.ensemble:RandomForestClassifier"
    fixed_params: ClassVar[Mapping[str, Any]] = {"n_jobs": 1}
    space: Mapping[str, Dimension] = {
        "n_estimators": Int(10, 200, log=True),
        "max_depth": Int(2, 20),
        "max_features": Choice(["sqrt", "log2", None]),
        "min_samples_leaf": Int(1, 20),
    }


class SVCTuning(SklearnTuning):
    """SVC on standardised features: C, gamma and kernel."""

    name = "svc"
    estimator_path = "sklearn.svm:SVC"
    scaler_path = "sklearn.preprocessing:StandardScaler"
    fixed_params: ClassVar[Mapping[str, Any]] = {"degree": 3, "coef0": 0.0, "cache_size": 200}
    uses_random_state = False
    space: Mapping[str, Dimension] = {
        "C": Float(1e-3, 1e3, log=True),
        "gamma": Float(1e-5, 1e1, log=True),
        "kernel": Choice(["rbf", "poly", "sigmoid"]),
    }
