"""The estimator reads the config that loading will read: a hub model at the recipe's model.revision."""

from __future__ import annotations

import json

from helpers import hub_cache_model

from qlora_trainer.estimate.shape_lookup import shape_for_model

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 256}


def _config(layers: int) -> bytes:
    return json.dumps({**LLAMA, "num_hidden_layers": layers}).encode()


def test_a_hub_model_is_estimated_at_its_revision(offline_hub):
    hub_cache_model(offline_hub, "org/tiny", {"main": {"config.json": _config(2)}, "deeper": {"config.json": _config(5)}})
    assert shape_for_model("org/tiny").layers == 2
    assert shape_for_model("org/tiny", revision="deeper").layers == 5
    assert shape_for_model("org/tiny", revision="main").layers == 2


def test_the_estimate_command_honours_model_revision(offline_hub, write_recipe, capsys):
    from qlora_trainer.cli import main

    hub_cache_model(offline_hub, "org/tiny", {"main": {"config.json": _config(2)}, "deeper": {"config.json": _config(5)}})
    trainable = {}
    for revision in ("main", "deeper"):
        recipe = write_recipe(f"model: {{name_or_path: org/tiny, revision: {revision}}}\ndata: {{path: rows.jsonl}}\n"
                              "train: {seq_len: 64}\n")
        assert main(["estimate", "--recipe", str(recipe), "--json"]) == 0
        trainable[revision] = json.loads(capsys.readouterr().out)["trainable_params"]
    # The adapters are the same in every layer: 5 layers hold 5/2 of what 2 hold.
    assert trainable["deeper"] * 2 == trainable["main"] * 5 and trainable["main"] > 0
