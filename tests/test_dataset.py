"""Dataset format, importers, synthetic generator and input validation."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gtc_ray.cli import main
from gtc_ray.data.dataset import describe, load_dataset
from gtc_ray.data.importers import import_mmrec, import_tables, kcore, split_random_per_user
from gtc_ray.data.synth import PRESETS, SynthSpec, generate
from gtc_ray.errors import GtcInputError

QUIET = dict(log=lambda m: None)


def make_mmrec(root, users=None, items=None, labels=None, feats=None, header="userID\titemID\trating\ttimestamp\tx_label"):
    """A small valid MMRec folder (6 users x 8 items) unless parts are overridden."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if users is None:
        users, items, labels = [], [], []
        for u in range(6):
            its = rng.permutation(8)[:6]
            for j, i in enumerate(its):
                users.append(u); items.append(int(i)); labels.append(0 if j < 4 else (1 if j == 4 else 2))
    lines = [header] + [f"{u}\t{i}\t4.0\t{1000 + k}\t{l}" for k, (u, i, l) in enumerate(zip(users, items, labels))]
    (root / "toy.inter").write_text("\n".join(lines) + "\n")
    n_items = max(items) + 1
    feats = feats if feats is not None else {"image": rng.normal(size=(n_items, 6)), "text": rng.normal(size=(n_items, 4))}
    for name, f in feats.items():
        np.save(root / f"{name}_feat.npy", f)
    return root


def test_synth_and_describe(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "s"), "--preset", "tiny", "--seed", "3"]) == 0
    info = describe(tmp_path / "s")
    assert info["num_users"] == 60 and info["num_items"] == 40 and set(info["modalities"]) == {"image", "text"}
    capsys.readouterr()
    assert main(["data", "describe", str(tmp_path / "s"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_users"] == 60 and out["splits"]["train"] > 0


def test_synth_presets_scale():
    assert (PRESETS["baby"].users, PRESETS["baby"].items, PRESETS["baby"].interactions) == (19_445, 7_050, 160_792)
    assert (PRESETS["sports"].users, PRESETS["sports"].items) == (35_598, 18_357)
    assert (PRESETS["clothing"].users, PRESETS["clothing"].items) == (39_387, 23_033)
    ds = generate(SynthSpec(2_000, 500, 30_000, clusters=10, modalities=(("image", 16),)), seed=1)
    assert abs(len(ds.users) - 30_000) / 30_000 < 0.1  # close to the requested size
    f = ds.features["image"] / np.linalg.norm(ds.features["image"], axis=1, keepdims=True)
    assert (f @ f.T).mean() < 0.5  # not one shared direction


def _co_consumed_margin(ds, feats):
    """Mean feature cosine of the 10% most co-consumed item pairs (cosine of their user columns)
    minus that of all item pairs."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sims = f @ f.T
    x = np.zeros((ds.num_users, ds.num_items), np.float32)
    x[ds.users, ds.items] = 1
    co = x.T @ x
    co = co / np.sqrt(np.outer(np.diag(co), np.diag(co)))
    off = ~np.eye(ds.num_items, dtype=bool)
    top = off & (co >= np.quantile(co[off], 0.9))
    return sims[top].mean() - sims[off].mean()


def test_synth_features_carry_the_planted_clusters():
    # users prefer a few clusters, so co-consumed items share a cluster more often than random
    # pairs; features that carry the cluster (and only those) are then more similar for them.
    # Fails if the features ignore the item latent or its cluster, or sit on randomly wrong items.
    ds = generate(SynthSpec(400, 200, 6_000, clusters=8, modalities=(("image", 16), ("text", 8))), seed=1)
    for name, feats in ds.features.items():
        margin = _co_consumed_margin(ds, feats)
        shuffled = _co_consumed_margin(ds, feats[np.random.default_rng(0).permutation(ds.num_items)])
        assert margin > 0.15 and abs(shuffled) < 0.05, (name, margin, shuffled)  # random rows: no margin


def test_synth_is_seeded(tmp_path):
    a, b = generate(PRESETS["tiny"], seed=5), generate(PRESETS["tiny"], seed=5)
    assert np.array_equal(a.users, b.users) and np.array_equal(a.items, b.items)
    assert np.array_equal(a.features["image"], b.features["image"])


def test_mmrec_import_roundtrip(tmp_path):
    src = make_mmrec(tmp_path / "src")
    man = import_mmrec(src, tmp_path / "out", **QUIET)
    ds = load_dataset(tmp_path / "out")
    assert man["num_users"] == 6 and man["num_items"] == ds.num_items
    assert ds.features["image"].dtype == np.float32 and ds.features["text"].shape[1] == 4
    raw = np.load(src / "image_feat.npy").astype(np.float32)
    assert np.array_equal(ds.features["image"], raw)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temporary leftovers


@pytest.mark.shared_data
def test_ml100k_import_figures(ml100k_src, tmp_path, capsys):
    out = tmp_path / "ml"
    assert main(["data", "import-mmrec", str(ml100k_src), str(out)]) == 0
    capsys.readouterr()
    info = describe(out)
    assert info["num_users"] == 943 and info["num_items"] == 1349 and info["num_interactions"] == 99_287
    assert info["splits"] == {"train": 79_790, "valid": 9_531, "test": 9_966}
    assert info["modalities"] == {"image": 1280, "text": 384}
    assert main(["data", "describe", str(out)]) == 0
    text = capsys.readouterr().out
    assert "943" in text and "1,349" in text and "79,790" in text and "image (1,280)" in text


def test_split_rule_matches_spec():
    users = np.repeat(np.arange(3), [5, 10, 21])
    lab = split_random_per_user(users, seed=0)
    for u, n in zip(range(3), [5, 10, 21]):
        l = lab[users == u]
        if n < 10:
            assert (l == 1).sum() == 1 and (l == 2).sum() == 1
        else:
            vt = int(0.2 * n)
            assert (l == 1).sum() == vt // 2 and (l == 2).sum() == vt - vt // 2
    assert np.array_equal(lab, split_random_per_user(users, seed=0))  # seeded (B12)


def test_kcore_iterates():
    # k=2: a 2x2 block (rows 0-3) survives; the tail (rows 4-7) unravels one row per pass:
    # item 3 has 1 row -> drop row 7; then user 3 has 1 -> row 6; then item 2 has 1 -> row 4;
    # then user 2 has 1 -> row 5. One pass (or two) would keep some of rows 4-6.
    u = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    i = np.array([0, 1, 0, 1, 2, 0, 2, 3])
    np.testing.assert_array_equal(kcore(u, i, 2), [True] * 4 + [False] * 4)
    # adding the missing row for item 3 makes the whole tail a 2-core: nothing is dropped
    u2, i2 = np.r_[u, 2], np.r_[i, 3]
    assert kcore(u2, i2, 2).all()
    assert kcore(u, i, 1).all()


def _write_tables(tmp_path, dup=False, missing_feat=False, with_ts=True):
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"m{i}", 1000 + k) for k, (u, i) in enumerate((u, i) for u in range(8) for i in rng.permutation(10)[:7])]
    if dup:
        rows.append(rows[0])
    cols = {"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows]}
    if with_ts:
        cols["timestamp"] = [r[2] for r in rows]
    pq.write_table(pa.table(cols), tmp_path / "inter.parquet")
    ids = [f"m{i}" for i in range(10 - (1 if missing_feat else 0))]
    f = rng.normal(size=(len(ids), 5)).astype(np.float32)
    pq.write_table(pa.table({"item_id": ids, "feature": pa.array(list(f), pa.list_(pa.float32()))}), tmp_path / "img.parquet")
    return tmp_path / "inter.parquet", tmp_path / "img.parquet"


def test_generic_import(tmp_path):
    inter, img = _write_tables(tmp_path)
    man = import_tables(inter, tmp_path / "out", features={"image": str(img)}, kcore_k=3, split="chrono", **QUIET)
    ds = load_dataset(tmp_path / "out")
    assert man["num_users"] == 8 and ds.features["image"].shape == (man["num_items"], 5)
    # chronological: each user's test row is their latest
    for u in range(ds.num_users):
        m = ds.users == u
        assert ds.timestamps[m][ds.split[m] == 2].min() >= ds.timestamps[m][ds.split[m] == 0].max()
    # raw ids map back
    assert set(ds.user_ids) == {f"u{u}" for u in range(8)}


# ------------------------------------------------------------------------------------- bad input
def _bad_cases():
    def missing_column(t):
        return make_mmrec(t / "src", header="userID\titemID\trating\ttimestamp\tlabel"), "missing column 'x_label'"

    def float_ids(t):
        src = make_mmrec(t / "src")
        (src / "toy.inter").write_text((src / "toy.inter").read_text().replace("\n0\t", "\n0.5\t", 1))
        return src, "not integer"

    def too_few_feature_rows(t):
        return make_mmrec(t / "src", feats={"image": np.ones((3, 4))}), "has 3 rows but the interactions name"

    def noncontiguous_users(t):
        return make_mmrec(t / "src", users=[0, 0, 0, 2, 2, 2], items=[0, 1, 2, 0, 1, 2], labels=[0, 1, 2] * 2,
                          feats={"image": np.ones((3, 2))}), "not contiguous"

    def duplicate_pairs(t):
        return make_mmrec(t / "src", users=[0, 0, 0, 0, 1, 1, 1], items=[0, 0, 1, 2, 0, 1, 2],
                          labels=[0, 0, 1, 2, 0, 1, 2], feats={"image": np.ones((3, 2))}), "pass --dedup to `gtc-ray data import-mmrec`"

    def nan_feature(t):
        f = np.ones((8, 3)); f[2, 1] = np.nan
        return make_mmrec(t / "src", feats={"image": f}), "image_feat.npy: 1 of 8 rows contain NaN or infinite values (first bad item row 2)"

    def inf_feature(t):
        f = np.ones((8, 3)); f[5, 0] = np.inf
        return make_mmrec(t / "src", feats={"text": f}), "text_feat.npy: 1 of 8 rows contain NaN or infinite values (first bad item row 5)"

    def empty_test_split(t):
        return make_mmrec(t / "src", users=[0, 0, 1, 1], items=[0, 1, 0, 1], labels=[0, 1, 0, 1],
                          feats={"image": np.ones((2, 2))}), "test split is empty"

    def no_inter_file(t):
        (t / "src").mkdir()
        return t / "src", "has 0 .inter files"

    def pickled_feature(t):
        src = make_mmrec(t / "src")
        np.save(src / "image_feat.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        return src, "plain numeric array"

    def one_d_feature(t):
        return make_mmrec(t / "src", feats={"image": np.ones(8)}), "2-D float array"

    def bad_label(t):
        return make_mmrec(t / "src", users=[0, 0, 0, 1, 1, 1], items=[0, 1, 2, 0, 1, 2], labels=[0, 1, 5, 0, 1, 2],
                          feats={"image": np.ones((3, 2))}), "labels must be 0"

    return [missing_column, float_ids, too_few_feature_rows, noncontiguous_users, duplicate_pairs, nan_feature,
            inf_feature, empty_test_split, no_inter_file, pickled_feature, one_d_feature, bad_label]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda f: f.__name__)
def test_bad_mmrec_input_is_rejected_and_nothing_written(case, tmp_path):
    src, needle = case(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(GtcInputError) as e:
        import_mmrec(src, out, **QUIET)
    assert needle in str(e.value), str(e.value)
    assert "Fix:" in str(e.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_mmrec_nan_feature_names_the_input_file_cli(tmp_path, capsys):
    # the error must name the user's .npy, not the not-yet-written <out>/features/text
    f = np.ones((8, 4)); f[3, 1] = np.nan; f[6, 0] = -np.inf
    src = make_mmrec(tmp_path / "src", feats={"image": np.ones((8, 3)), "text": f})
    out = tmp_path / "out"
    assert main(["data", "import-mmrec", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src / 'text_feat.npy'}: 2 of 8 rows contain NaN or infinite values (first bad item row 3)" in err, err
    assert "Fix:" in err and "features/text" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written, no temp dir


def test_mmrec_duplicates_cli_and_dedup(tmp_path, capsys):
    # rows 0 and 2 are the same (user 0, item 0): row 0 (split 0, timestamp 1000) must be kept
    users, items = [0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 2, 0, 1, 2, 1]
    labels = [0, 1, 2, 2, 0, 1, 2, 0]
    src = make_mmrec(tmp_path / "src", users=users, items=items, labels=labels, feats={"image": np.ones((3, 2))})
    out = tmp_path / "out"
    assert main(["data", "import-mmrec", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert "toy.inter: 2 duplicate (user, item) pairs" in err and "pass --dedup" in err, err
    assert "generic importer" not in err and not out.exists()
    assert main(["data", "import-mmrec", str(src), str(out), "--dedup"]) == 0
    ds = load_dataset(out)
    assert len(ds.users) == 6 and ds.manifest["num_interactions"] == 6
    got = sorted(zip(ds.users.tolist(), ds.items.tolist(), ds.split.tolist(), ds.timestamps.tolist()))
    assert got == [(0, 0, 0, 1000), (0, 1, 1, 1001), (0, 2, 2, 1003),
                   (1, 0, 0, 1004), (1, 1, 1, 1005), (1, 2, 2, 1006)]  # first row of each pair, file order
    prov = ds.manifest["provenance"]
    assert prov["dedup"] is True and prov["dropped_duplicate_rows"] == 2


@pytest.mark.parametrize("kind, needle", [
    ("dup", "duplicate (user, item) rows"),
    ("missing_feat", "have no feature row"),
    ("chrono_no_ts", "needs a timestamp column"),
    ("kcore_empty", "no rows survive"),
    ("bad_column", "missing column 'uid'"),
])
def test_bad_table_input(kind, needle, tmp_path):
    inter, img = _write_tables(tmp_path, dup=kind == "dup", missing_feat=kind == "missing_feat",
                               with_ts=kind != "chrono_no_ts")
    kw = dict(features={"image": str(img)}, kcore_k=3, **QUIET)
    if kind == "chrono_no_ts":
        kw["split"] = "chrono"
    if kind == "kcore_empty":
        kw["kcore_k"] = 50
    if kind == "bad_column":
        kw["user_col"] = "uid"
    with pytest.raises(GtcInputError, match="Fix:") as e:
        import_tables(inter, tmp_path / "out", **kw)
    assert needle in str(e.value)
    assert not (tmp_path / "out").exists()


def test_edited_dataset_is_caught(tmp_path):
    import_mmrec(make_mmrec(tmp_path / "src"), tmp_path / "out", **QUIET)
    # hash check: any edit of a table after import
    t = pq.read_table(tmp_path / "out" / "interactions.parquet")
    pq.write_table(t.slice(1), tmp_path / "out" / "interactions.parquet")
    with pytest.raises(GtcInputError, match="no longer matches the hash"):
        load_dataset(tmp_path / "out")


def test_manifest_width_mismatch_is_caught(tmp_path):
    import_mmrec(make_mmrec(tmp_path / "src"), tmp_path / "out", **QUIET)
    mf = tmp_path / "out" / "manifest.json"
    m = json.loads(mf.read_text()); m["modalities"]["image"]["dim"] = 99
    mf.write_text(json.dumps(m))
    with pytest.raises(GtcInputError, match="differs from the manifest's 99"):
        load_dataset(tmp_path / "out")


def test_existing_output_is_kept(tmp_path, capsys):
    src = make_mmrec(tmp_path / "src")
    import_mmrec(src, tmp_path / "out", **QUIET)
    before = (tmp_path / "out" / "manifest.json").read_text()
    assert main(["data", "import-mmrec", str(src), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "manifest.json").read_text() == before
    import_mmrec(src, tmp_path / "out", overwrite=True, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_cli_error_exit_status(tmp_path, capsys):
    assert main(["data", "describe", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and "Traceback" not in err
