import pytest

from gtc_ray.config import Config, config_from_dict, load_config, parse_override
from gtc_ray.errors import GtcInputError


def test_defaults_are_the_spec():
    c = load_config()
    assert (c.model.embedding_size, c.model.noise_steps, c.model.diff_weight, c.model.reg_weight) == (64, 600, 0.7, 1e-3)
    assert (c.train.lr, c.train.batch_size, c.train.patience, c.train.seed) == (1e-4, 2048, 20, 999)
    assert (c.graph.knn_k, c.graph.mm_image_weight, c.model.user_graph_k) == (10, 0.1, 40)
    assert c.eval.valid_metric == "recall@20" and c.eval.topk == [5, 10, 20, 50]


def test_overrides_and_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("graph:\n  knn_k: 7\ntrain:\n  lr: 1e-3\n")
    c = load_config(f, ["train.epochs=3", "model.gate=per_modality"])
    assert c.graph.knn_k == 7 and c.train.lr == 1e-3 and c.train.epochs == 3 and c.model.gate == "per_modality"
    assert config_from_dict(c.to_dict()) == c


@pytest.mark.parametrize("override, needle", [
    ("graph.knn=3", "valid keys of [graph] are"),
    ("grph.knn_k=3", "unknown section"),
    ("train.lr=-1", "positive"),
    ("train.epochs=abc", "expected int"),
    ("model.tc_mode=cubic", "not one of"),
    ("eval.valid_metric=recall@7", "not a computed metric"),
    ("trainlr=1", "section.key=value"),
    ("model.beta_end=0.00001", "beta_start < beta_end"),
])
def test_bad_overrides_name_the_key_and_fix(override, needle):
    with pytest.raises(GtcInputError) as e:
        load_config(overrides=[override])
    assert needle in str(e.value) and "Fix:" in str(e.value)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(GtcInputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("graph: [1, 2\n")
    with pytest.raises(GtcInputError, match="not valid YAML"):
        load_config(bad)


def test_parse_override_types():
    assert load_config(overrides=["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert parse_override("eval.topk=[5, 10]") == {"eval": {"topk": [5, 10]}}
    assert isinstance(Config().to_dict()["graph"], dict)
