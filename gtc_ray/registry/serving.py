"""The served GTC recommender: an MLflow pyfunc model "from code" (this file travels with the model).

It needs numpy, pandas and mlflow only: no Ray, no torch, no gtc-ray. Artifacts (one .npz):
user_emb [U, D], item_emb [I, D], seen_indptr/seen_indices (each user's interacted items, CSR),
user_ids [U], item_ids [I] (raw ids).

Input: a DataFrame with columns user_id (str), k (int), exclude_seen (bool).
Output: one row per recommendation: user_id, rank (1..k), item_id, score.
"""

import warnings

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

# the explicit ModelSignature logged with the model validates inputs; type hints would be redundant
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")


class GtcRecommender(PythonModel):
    def load_context(self, context):
        with np.load(context.artifacts["embeddings"], allow_pickle=False) as z:
            self.user_emb = z["user_emb"]
            self.item_emb = z["item_emb"]
            self.seen_indptr = z["seen_indptr"]
            self.seen_indices = z["seen_indices"]
            self.user_ids = z["user_ids"].astype(str)
            self.item_ids = z["item_ids"].astype(str)
        self.user_index = {u: j for j, u in enumerate(self.user_ids)}

    def recommend(self, user_id: str, k: int, exclude_seen: bool = True) -> pd.DataFrame:
        u = self.user_index.get(str(user_id))
        if u is None:
            raise ValueError(f"user id {user_id!r} is unknown to this model ({len(self.user_ids)} users); "
                             "fix: pass a raw user id from the training data (cold-start users are not served)")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores = self.item_emb @ self.user_emb[u]
        if exclude_seen:
            scores = scores.astype(np.float64)
            scores[self.seen_indices[self.seen_indptr[u]:self.seen_indptr[u + 1]]] = -np.inf
        k = min(int(k), int(np.isfinite(scores).sum()))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]  # score descending, ties by item index
        return pd.DataFrame({"user_id": str(user_id), "rank": np.arange(1, len(top) + 1, dtype=np.int64),
                             "item_id": self.item_ids[top], "score": scores[top].astype(np.float64)})

    def predict(self, context, model_input, params=None):
        df = pd.DataFrame(model_input)
        if "user_id" not in df:
            raise ValueError("input needs a user_id column (and optionally k, exclude_seen)")
        ks = df["k"] if "k" in df else pd.Series(10, index=df.index)
        ex = df["exclude_seen"] if "exclude_seen" in df else pd.Series(True, index=df.index)
        parts = [self.recommend(u, int(k), bool(e)) for u, k, e in zip(df["user_id"], ks, ex)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            {"user_id": [], "rank": [], "item_id": [], "score": []})


set_model(GtcRecommender())
