"""Datasets and prepared graphs at URIs: S3 (moto on loopback, the `s3` fixture), file://, and
commit-last publishing that never shows a reader half a dataset."""

import json
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from gtc_ray import storage
from gtc_ray.cli import main
from gtc_ray.config import GraphConfig
from gtc_ray.data import dataset as dsmod
from gtc_ray.data.dataset import describe, file_uri, load_dataset, read_manifest, replace_modality, verify_hashes
from gtc_ray.data.prepare import prepare
from gtc_ray.data.synth import synth
from gtc_ray.errors import GtcInputError

QUIET = lambda m: None
TINY_FILES = ["features/image.parquet", "features/text.parquet", "interactions.parquet", "items.parquet",
              "manifest.json", "users.parquet"]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Staging directories go to a private temp dir (so a test can see that none is left) and the
    working directory is an empty folder (so a URI is never mistaken for a relative local path)."""
    t = tmp_path / "systmp"
    t.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(t))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return {"tmp": t, "cwd": cwd}


def _fail_upload_after(monkeypatch, n: int):
    """storage.upload_dir that uploads the first `n` files, then fails like a dropped connection."""
    def upload_dir(local_dir, loc, skip=()):
        files = [f for f in sorted(local_dir.rglob("*")) if f.is_file()
                 and f.relative_to(local_dir).as_posix() not in skip]
        for f in files[:n]:
            storage.write_bytes(storage.join(loc, f.relative_to(local_dir).as_posix()), f.read_bytes())
        raise OSError("simulated network failure during upload")
    monkeypatch.setattr(storage, "upload_dir", upload_dir)


def _consistent(uri: str) -> bool:
    """No manifest, or a manifest whose every hash matches the file beside it."""
    if not storage.is_file(storage.join(uri, "manifest.json")):
        return True
    verify_hashes(uri, read_manifest(uri))
    return True


@pytest.mark.timeout(120)
def test_synth_to_s3_matches_local(s3, tmp_path, private_tmp):
    uri = s3() + "/tiny"
    man = synth(uri, "tiny", seed=0)
    synth(tmp_path / "local", "tiny", seed=0)
    assert storage.walk_files(uri) == TINY_FILES  # the dataset lives in the bucket
    assert list(private_tmp["tmp"].iterdir()) == [] and list(private_tmp["cwd"].iterdir()) == []
    ds, ref = load_dataset(uri), load_dataset(tmp_path / "local")
    assert isinstance(ds.path, str) and ds.path == uri
    assert isinstance(ref.path, str) and ref.path == str(tmp_path / "local")
    assert ds.content_hash == ref.content_hash == man["content_hash"]
    np.testing.assert_array_equal(ds.users, ref.users)
    for m in ref.features:
        np.testing.assert_array_equal(ds.features[m], ref.features[m])
    info = describe(uri)
    assert info["path"] == uri and info["num_users"] == 60 and info["content_hash"] == ref.content_hash
    # file_uri: a table that pyarrow (and ray.data.read_parquet) reads straight from the bucket
    assert file_uri(ds, "interactions.parquet") == uri + "/interactions.parquet"
    assert pq.read_table(file_uri(ds, ds.manifest["modalities"]["image"]["file"])).num_rows == ds.num_items
    assert file_uri(uri + "/", "items.parquet") == uri + "/items.parquet"
    assert file_uri(ref, "interactions.parquet") == str(tmp_path / "local" / "interactions.parquet")


@pytest.mark.timeout(120)
def test_edited_file_on_s3_is_caught_naming_the_uri(s3):
    uri = s3() + "/tiny"
    synth(uri, "tiny", seed=0)
    t = pq.read_table(storage.open_input(storage.join(uri, "interactions.parquet")))
    pq.write_table(t.slice(1), storage.join(uri, "interactions.parquet"))
    with pytest.raises(GtcInputError, match="no longer matches the hash") as e:
        load_dataset(uri)
    assert f"{uri}/interactions.parquet" in str(e.value)


@pytest.mark.timeout(120)
def test_interrupted_publish_leaves_no_manifest(s3, monkeypatch, capsys):
    uri = s3() + "/tiny"
    _fail_upload_after(monkeypatch, 2)
    with pytest.raises(GtcInputError, match="could not be written"):
        synth(uri, "tiny", seed=0)
    assert len(storage.walk_files(uri)) == 2 and "manifest.json" not in storage.walk_files(uri)
    monkeypatch.undo()
    with pytest.raises(GtcInputError, match="has files but no manifest.json") as e:
        load_dataset(uri)
    assert uri in str(e.value) and "interrupted" in str(e.value) and "--overwrite" in str(e.value)
    assert main(["data", "describe", uri]) == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and "--overwrite" in err and "Traceback" not in err
    with pytest.raises(GtcInputError, match="already exists"):  # a partial dataset is not silently replaced
        synth(uri, "tiny", seed=0)
    synth(uri, "tiny", seed=0, overwrite=True)
    assert load_dataset(uri).num_users == 60 and storage.walk_files(uri) == TINY_FILES


@pytest.mark.timeout(180)
def test_interrupted_overwrite_never_leaves_a_mismatched_manifest(s3, monkeypatch):
    uri = s3() + "/tiny"
    old = synth(uri, "tiny", seed=0)
    for n in (0, 1, 4):
        _fail_upload_after(monkeypatch, n)
        with pytest.raises(GtcInputError):
            synth(uri, "tiny", seed=1, overwrite=True)
        monkeypatch.undo()
        assert not storage.is_file(storage.join(uri, "manifest.json")) and _consistent(uri)
        synth(uri, "tiny", seed=0, overwrite=True)
    # the commit itself fails: every table is new, the manifest never appears
    real = storage.write_bytes

    def write_bytes(loc, data):
        if str(loc).endswith("/manifest.json"):
            raise OSError("simulated failure of the commit")
        real(loc, data)
    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    with pytest.raises(GtcInputError, match="could not be written"):
        synth(uri, "tiny", seed=1, overwrite=True)
    monkeypatch.undo()
    assert not storage.is_file(storage.join(uri, "manifest.json"))
    with pytest.raises(GtcInputError, match="has files but no manifest.json"):
        load_dataset(uri)
    new = synth(uri, "tiny", seed=1, overwrite=True)
    assert new["content_hash"] != old["content_hash"] and load_dataset(uri).content_hash == new["content_hash"]


@pytest.mark.timeout(120)
def test_publish_order_on_s3(s3, monkeypatch):
    """Old manifest deleted before any new file appears; the new manifest is the last write."""
    uri = s3() + "/tiny"
    synth(uri, "tiny", seed=0)
    events = []
    for fn in ("delete", "upload_dir", "write_bytes"):
        real = getattr(storage, fn)
        monkeypatch.setattr(storage, fn, lambda *a, _r=real, _n=fn, **k: (events.append((_n, str(a[1] if _n == "upload_dir" else a[0]))), _r(*a, **k))[1])
    synth(uri, "tiny", seed=1, overwrite=True)
    assert events[0] == ("delete", uri + "/manifest.json")
    assert events[-1] == ("write_bytes", uri + "/manifest.json")
    assert [e for e in events if e[0] != "delete"][0][0] == "upload_dir"
    events.clear()
    replace_modality(uri, "audio", np.ones((40, 3), np.float32), {"test": True})
    assert events[0] == ("delete", uri + "/manifest.json") and events[-1] == ("write_bytes", uri + "/manifest.json")


@pytest.mark.timeout(120)
def test_replace_modality_on_s3_matches_local(s3, tmp_path, private_tmp):
    uri = s3() + "/tiny"
    synth(uri, "tiny", seed=0)
    synth(tmp_path / "local", "tiny", seed=0)
    before = storage.read_bytes(storage.join(uri, "interactions.parquet"))
    f = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    g = np.random.default_rng(1).normal(size=(40, 32)).astype(np.float32)
    for loc in (uri, tmp_path / "local"):
        replace_modality(loc, "audio", f, {"source": "test"})
        replace_modality(loc, "image", g, {"source": "test"})
    ds, ref = load_dataset(uri), load_dataset(tmp_path / "local")
    assert ds.content_hash == ref.content_hash and sorted(ds.features) == ["audio", "image", "text"]
    np.testing.assert_array_equal(ds.features["audio"], f)
    np.testing.assert_array_equal(ds.features["image"], g)
    assert ds.manifest["provenance"]["features"]["audio"] == {"source": "test"}
    assert storage.read_bytes(storage.join(uri, "interactions.parquet")) == before  # unchanged files kept
    assert storage.walk_files(uri) == sorted(TINY_FILES + ["features/audio.parquet"])
    assert list(private_tmp["tmp"].iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "local", "systmp"]  # no local leftovers
    with pytest.raises(GtcInputError, match="rows for 40 items"):
        replace_modality(uri, "bad", np.ones((3, 2), np.float32), {})
    assert load_dataset(uri).content_hash == ds.content_hash


@pytest.mark.timeout(180)
def test_prepare_on_s3_caches_in_the_bucket(s3, tmp_path, monkeypatch):
    uri = s3() + "/tiny"
    synth(uri, "tiny", seed=0)
    synth(tmp_path / "local", "tiny", seed=0)
    cfg = GraphConfig(knn_k=5)
    ds = load_dataset(uri)
    logs = []
    g1 = prepare(ds, cfg, log=logs.append)
    assert isinstance(g1.path, str) and g1.path == f"{uri}/prepared/{g1.key}"
    assert storage.walk_files(g1.path) == ["graphs.npz", "meta.json"]
    assert json.loads(storage.read_text(storage.join(g1.path, "meta.json")))["key"] == g1.key
    ref = prepare(load_dataset(tmp_path / "local"), cfg, log=QUIET)
    assert ref.key == g1.key and (ref.item_item != g1.item_item).nnz == 0
    # second call: a cache hit that only reads the bucket (building or writing would fail)
    import gtc_ray.data.prepare as prep

    def no(*a, **k):
        raise AssertionError("a cache hit must only read")
    monkeypatch.setattr(prep, "build_graphs", no)
    for fn in ("write_bytes", "upload_dir", "publish_dir", "delete"):
        monkeypatch.setattr(storage, fn, no)
    logs.clear()
    g2 = prepare(load_dataset(uri), cfg, log=logs.append)
    assert logs == [f"using prepared graphs {g1.path}"] and g2.path == g1.path
    assert (g1.item_item != g2.item_item).nnz == 0 and (g1.user_user != g2.user_user).nnz == 0
    # the dataset's own files are untouched by prepare; its hashes still verify
    monkeypatch.undo()
    assert load_dataset(uri).content_hash == ds.content_hash


@pytest.mark.timeout(180)
def test_prepare_on_s3_interrupted_publish_is_rebuilt(s3, monkeypatch):
    uri = s3() + "/tiny"
    synth(uri, "tiny", seed=0)
    ds, cfg = load_dataset(uri), GraphConfig(knn_k=5)
    real = storage.write_bytes

    def write_bytes(loc, data):
        if str(loc).endswith("/meta.json"):
            raise OSError("simulated failure of the commit")
        real(loc, data)
    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    logs = []
    g = prepare(ds, cfg, log=logs.append)  # still usable for this run
    assert g.item_item.shape == (40, 40) and any("could not cache" in m for m in logs)
    assert storage.walk_files(g.path) == ["graphs.npz"]  # no commit: not a cache entry
    monkeypatch.undo()
    logs.clear()
    prepare(ds, cfg, log=logs.append)
    assert logs[0] == f"preparing graphs -> {g.path}"
    assert storage.walk_files(g.path) == ["graphs.npz", "meta.json"]
    logs.clear()
    prepare(ds, cfg, log=logs.append)
    assert logs == [f"using prepared graphs {g.path}"]


@pytest.mark.timeout(120)
def test_file_uri_works_like_a_local_path(tmp_path):
    loc = f"file://{tmp_path}/f"
    man = synth(loc, "tiny", seed=0)
    assert (tmp_path / "f" / "manifest.json").is_file()
    ds = load_dataset(loc)
    assert ds.path == str(tmp_path / "f") and ds.content_hash == man["content_hash"]
    assert describe(loc)["path"] == str(tmp_path / "f")
    assert file_uri(loc, "interactions.parquet") == str(tmp_path / "f" / "interactions.parquet")
    g = prepare(ds, GraphConfig(knn_k=5), log=QUIET)
    assert g.path == tmp_path / "f" / "prepared" / g.key and (g.path / "graphs.npz").is_file()
    replace_modality(loc, "audio", np.ones((40, 2), np.float32), {})
    assert load_dataset(tmp_path / "f").features["audio"].shape == (40, 2)
    with pytest.raises(GtcInputError, match="already exists"):
        synth(loc, "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.timeout(180)
def test_cli_synth_describe_prepare_on_s3(s3, private_tmp, capsys):
    uri = s3() + "/tiny"
    assert main(["data", "synth", uri, "--preset", "tiny"]) == 0
    assert f"wrote {uri}" in capsys.readouterr().out
    assert main(["data", "describe", uri]) == 0
    out = capsys.readouterr().out
    assert f"({uri})" in out and "users        60" in out
    assert main(["data", "describe", uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == uri
    assert main(["prepare", uri, "--set", "graph.knn_k=5"]) == 0
    assert f"graphs ready at {uri}/prepared/" in capsys.readouterr().out
    assert main(["prepare", uri, "--set", "graph.knn_k=5"]) == 0
    assert "using prepared graphs" in capsys.readouterr().out
    assert main(["data", "synth", uri, "--preset", "tiny"]) == 2  # refused as for a local directory
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "synth", uri, "--preset", "tiny", "--seed", "4", "--overwrite"]) == 0
    assert load_dataset(uri).manifest["provenance"]["seed"] == 4
    assert storage.walk_files(uri) == TINY_FILES  # overwrite dropped the old version's prepared graphs
    assert list(private_tmp["cwd"].iterdir()) == [] and list(private_tmp["tmp"].iterdir()) == []


@pytest.mark.timeout(120)
def test_bad_locations_are_named(s3, tmp_path):
    bucket = s3()
    with pytest.raises(GtcInputError, match="root of a bucket"):
        synth(bucket, "tiny")
    with pytest.raises(GtcInputError, match="no manifest.json") as e:
        load_dataset(bucket + "/nothing-here")
    assert f"{bucket}/nothing-here" in str(e.value)
    with pytest.raises(GtcInputError) as e:
        load_dataset("s3://gtc-no-such-bucket-0000/ds")
    assert "s3://gtc-no-such-bucket-0000/ds" in str(e.value) and "Fix:" in str(e.value)
    with pytest.raises(GtcInputError, match="raw import inputs must be local"):
        from gtc_ray.data.importers import import_mmrec
        import_mmrec(bucket + "/src", tmp_path / "out", log=QUIET)
    assert dsmod.file_uri(bucket + "/d", "x.parquet") == bucket + "/d/x.parquet"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_data_reads_file_uri_on_s3(ray_cluster, s3):
    import ray.data
    uri = s3() + "/tiny"
    synth(uri, "tiny", seed=0)
    ds = load_dataset(uri)
    assert ray.data.read_parquet(file_uri(ds, "interactions.parquet")).count() == len(ds.users)
    assert ray.data.read_parquet(file_uri(ds, ds.manifest["modalities"]["text"]["file"])).count() == ds.num_items
