"""Bad input across the CLI: exit status 2, one paragraph naming the input and the fix, no
traceback (unless --debug), and nothing written (all are rejected before Ray or MLflow start)."""

import shutil

import pytest

from gtc_ray.cli import main

TINY_SETS = ["--set", "eval.topk=[5, 10, 20]", "--set", "graph.knn_k=5"]


def _snapshot(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture
def env(tiny, tmp_path, monkeypatch):
    """A private copy of the tiny dataset, a checkpoint of it, and an empty working directory."""
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return {"data": str(data), "tmp": tmp_path}


def _space(tmp, body):
    f = tmp / "space.yaml"
    f.write_text(body)
    return str(f)


def _checkpoint(tmp, data):
    from conftest import tiny_config
    from gtc_ray.train.run import run_training
    s = run_training(data, tiny_config(train={"epochs": 1}), runner="inprocess", storage=tmp / "ck", name="c",
                     log=lambda *a: None)
    return s["checkpoint"]


def _other_dataset(tmp):
    from gtc_ray.data.synth import synth
    synth(tmp / "other", "tiny", seed=9)
    return str(tmp / "other")


CASES = [
    ("unknown config key", lambda e: ["train", e["data"], "--set", "train.lrate=1"], "valid keys of [train]"),
    ("negative learning rate", lambda e: ["train", e["data"], "--set", "train.lr=-0.1"], "positive"),
    ("knn k larger than items", lambda e: ["train", e["data"], "--set", "eval.topk=[5, 10, 20]", "--set", "graph.knn_k=1000"],
     "exceeds the 40 items"),
    # a cut-off beyond the catalogue is dropped with a note (tests/test_train.py), but not the one selection uses
    ("valid metric's K larger than items", lambda e: ["train", e["data"], "--set", "graph.knn_k=5", "--set",
     "eval.valid_metric=recall@50"], "recall@50 needs more than the 40 items"),
    ("not a dataset", lambda e: ["train", str(e["tmp"] / "work")], "no manifest.json"),
    ("resume without name", lambda e: ["train", e["data"], "--resume", *TINY_SETS], "needs the --name"),
    ("missing config file", lambda e: ["train", e["data"], "--config", "nope.yaml"], "does not exist"),
    ("negative workers", lambda e: ["train", e["data"], "--workers", "-1", *TINY_SETS], "must be >= 0"),
    ("workers starve Ray Data", lambda e: ["train", e["data"], "--workers", "2", "--set", "ray.cpus_per_worker=1",
                                           *TINY_SETS], "would hang"),
    ("bad override syntax", lambda e: ["train", e["data"], "--set", "lr=1"], "section.key=value"),
    ("wrong value type", lambda e: ["train", e["data"], "--set", "train.epochs=many"], "expected int"),
    ("empty choice in space", lambda e: ["tune", e["data"], "--space", _space(e["tmp"], "params: {model.tc_weight: {choice: []}}")],
     "has no values"),
    ("reversed bounds in space", lambda e: ["tune", e["data"], "--space", _space(e["tmp"], "params: {train.lr: {uniform: [1, 0.1]}}")],
     "bounds reversed"),
    ("unknown parameter in space", lambda e: ["tune", e["data"], "--space", _space(e["tmp"], "params: {train.lrr: {uniform: [0.1, 1]}}")],
     "unknown config key"),
    ("missing space file", lambda e: ["tune", e["data"], "--space", "nope.yaml"], "does not exist"),
    ("missing MMRec folder", lambda e: ["data", "import-mmrec", "nope", "out"], "does not exist"),
    ("unknown synth preset", lambda e: ["data", "synth", "out", "--preset", "huge"], "unknown preset"),
    ("malformed --features", lambda e: ["data", "import", "x.csv", "out", "--features", "image"], "MODALITY=PATH"),
    ("checkpoint from another dataset", lambda e: ["evaluate", _checkpoint(e["tmp"], e["data"]), "--data",
                                                   _other_dataset(e["tmp"])], "was trained on dataset"),
    ("not a checkpoint", lambda e: ["evaluate", e["data"]], "not a gtc-ray checkpoint"),
    ("register without source", lambda e: ["register", "--name", "gtc"], "exactly one of --search"),
    ("register unknown search", lambda e: ["register", "--search", "nosuch", "--name", "gtc"], "has no summary"),
    ("prepare with k too large", lambda e: ["prepare", e["data"], "--set", "graph.knn_k=1000"], "exceeds the number of items"),
]


@pytest.mark.parametrize("label, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_cleanly(env, label, argv, needle, capsys):
    args = argv(env)  # may build fixtures (a checkpoint, another dataset) before the snapshot
    capsys.readouterr()
    before = _snapshot(env["tmp"])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Fix:" in err and "Traceback" not in err
    assert _snapshot(env["tmp"]) == before  # nothing written, not even into the dataset or cwd


def test_debug_shows_traceback(env):
    from gtc_ray.errors import GtcInputError
    with pytest.raises(GtcInputError):
        main(["--debug", "train", env["data"], "--set", "train.lr=-1"])


def test_argparse_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2
