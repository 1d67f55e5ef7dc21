"""Where a base's weight files are found (loading/weight_files.py): its directory, or the hub cache at the
recipe's revision, which loading, the fingerprint and the export share."""

from __future__ import annotations

import pytest
from helpers import hub_cache_model

from qlora_trainer.config.recipe import ModelSection
from qlora_trainer.errors import UserError
from qlora_trainer.loading.weight_files import base_safetensors, has_weight_files


def test_a_directory_lists_its_safetensors_sorted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors", "notes.bin.txt"):
        (tmp_path / name).write_bytes(b"")
    got = base_safetensors(ModelSection(name_or_path=str(tmp_path)))
    assert [p.name for p in got] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_pickle_weights_count_as_weights_and_a_config_alone_does_not(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not has_weight_files(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert has_weight_files(tmp_path)


def test_a_cached_hub_model_is_read_at_the_recipe_revision(offline_hub):
    snapshots = hub_cache_model(offline_hub, "org/model", {
        "main": {"config.json": b"{}", "model.safetensors": b""},
        "v2": {"config.json": b"{}", "model-00001-of-00002.safetensors": b"", "model-00002-of-00002.safetensors": b""},
    })
    main = base_safetensors(ModelSection(name_or_path="org/model"))
    v2 = base_safetensors(ModelSection(name_or_path="org/model", revision="v2"))
    assert main == [snapshots["main"] / "model.safetensors"]
    assert [p.parent for p in v2] == [snapshots["v2"]] * 2


def test_a_hub_model_not_cached_has_none_unless_it_must_be_fetched(offline_hub):
    assert base_safetensors(ModelSection(name_or_path="org/absent")) == []
    with pytest.raises(UserError, match="cannot fetch the weights of 'org/absent'.*pass a local copy with --base"):
        base_safetensors(ModelSection(name_or_path="org/absent"), download=True, fix="pass a local copy with --base")
