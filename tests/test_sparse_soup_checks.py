"""Sparse soups refuse what would give a silently wrong result: saved masks that disagree with their config or
checksum, damaged compact files, another run's workdir, non-finite soup weights and scores, meta-device models,
and bad arguments (each one CompressError naming the problem)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from compress.plugins.sparse_soup.format import SPARSE_WEIGHTS, pack_bits, unpack_bits
from compress.plugins.sparse_soup.model import check_saved_adapter
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import compress
from tests import tiny


def sparse_bert(seed: int = 0, **kwargs):
    kwargs.setdefault("sparsity", None if "pattern" in kwargs else 0.5)
    return get_peft_model(tiny.make_model("bert", seed=seed), compress.SparseSoupConfig(task_type="SEQ_CLS", **kwargs))


def meta_bert():
    with torch.device("meta"):
        return tiny.make_model("bert")


# -- saved adapters: masks against their config and their checksums ----------------------------------------------
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def saved_adapter(tmp_path: Path, **kwargs) -> Path:
    sparse_bert(**kwargs).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_masks(folder: Path, edit, keep_checksums: bool = True) -> None:
    """Apply ``edit(name, mask) -> mask`` to every saved mask (the checksums are kept, or dropped as an older
    version saved them)."""
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    for name in [k for k in tensors if k.endswith(".sparse_mask")]:
        tensors[name] = edit(name, tensors[name])
    if not keep_checksums:
        tensors.pop("sparse_mask_checksums", None)
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def load_adapter(folder: Path):
    return PeftModel.from_pretrained(tiny.make_model("bert"), folder)


def swap_one_kept_and_one_removed(name: str, mask: torch.Tensor) -> torch.Tensor:
    if "layer.0.attention.self.query" not in name:
        return mask
    flat = mask.clone().reshape(-1)
    kept, removed = int(flat.nonzero()[0]), int((~flat).nonzero()[0])
    flat[kept], flat[removed] = False, True  # the same count: only a checksum notices
    return flat.reshape(mask.shape)


def test_a_saved_adapter_carries_mask_checksums_and_loads_its_masks(tmp_path):
    model = sparse_bert()
    folder = saved_adapter(tmp_path)
    assert "sparse_mask_checksums" in load_file(folder / ADAPTER_WEIGHTS)
    loaded = load_adapter(folder)
    for name, layer in loaded.base_model.sparse_layers().items():
        assert torch.equal(layer.sparse_mask["default"], model.base_model.sparse_layers()[name].sparse_mask["default"])


@pytest.mark.parametrize(("edit", "match"), [
    (lambda folder: edit_masks(folder, lambda n, m: torch.ones_like(m)),
     r"mask of bert\.encoder\.layer\.0\..* differs from the checksum"),
    (lambda folder: edit_masks(folder, swap_one_kept_and_one_removed),
     r"mask of bert\.encoder\.layer\.0\.attention\.self\.query .* differs from the checksum"),
    (lambda folder: edit_masks(folder, lambda n, m: m.float()), "is torch.float32 .* a mask is a boolean"),
    (lambda folder: edit_config(folder, sparsity=0.3), r"removes 512 of 1024 weights .* says sparsity 0\.3"),
])
def test_saved_masks_that_disagree_with_their_checksum_or_config_are_refused(tmp_path, edit, match):
    folder = saved_adapter(tmp_path)
    edit(folder)
    with pytest.raises(compress.CompressError, match=match):
        load_adapter(folder)


def test_saved_masks_are_checked_without_the_base_model(tmp_path):
    folder = saved_adapter(tmp_path)
    check_saved_adapter(load_file(folder / ADAPTER_WEIGHTS), PeftConfig.from_pretrained(folder))
    edit_masks(folder, swap_one_kept_and_one_removed)
    with pytest.raises(compress.CompressError, match="differs from the checksum"):
        check_saved_adapter(load_file(folder / ADAPTER_WEIGHTS), PeftConfig.from_pretrained(folder))


def test_masks_without_checksums_load_with_a_warning_and_are_still_counted(tmp_path, caplog):
    folder = saved_adapter(tmp_path)
    edit_masks(folder, lambda n, m: m, keep_checksums=False)
    with caplog.at_level(logging.WARNING):
        load_adapter(folder)
    assert "no checksums" in caplog.text
    edit_masks(folder, lambda n, m: torch.ones_like(m), keep_checksums=False)  # edited to load dense
    with pytest.raises(compress.CompressError, match=r"removes 0 of .* says sparsity 0\.5"):
        load_adapter(folder)


def test_an_edited_pattern_or_global_sparsity_is_refused(tmp_path):
    folder = saved_adapter(tmp_path / "n_m", pattern="2:4")
    edit_config(folder, pattern="1:4", sparsity=0.75)
    with pytest.raises(compress.CompressError, match=r"keeps 2 in a group, but .* pattern '1:4'"):
        load_adapter(folder)
    folder = saved_adapter(tmp_path / "global", sparsity=0.6, scope="global")
    load_adapter(folder)  # layers lose different fractions: only the total is the config's
    edit_config(folder, sparsity=0.5)
    with pytest.raises(compress.CompressError, match=r"masks .* remove .* says sparsity 0\.5 overall"):
        load_adapter(folder)


# -- compact sparse files --------------------------------------------------------------------------------------------
def compact_folder(tmp_path: Path) -> Path:
    compress.save_sparse(sparse_bert().merge_and_unload(), tmp_path / "sparse")
    return tmp_path / "sparse"


def rewrite(path: Path, edit) -> None:
    """Rewrite a compact file with ``edit(tensors, metadata)`` applied."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(path)
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


def _first_sparse(tensors: dict) -> str:
    return sorted(k for k in tensors if k.endswith(".__mask__"))[0].removesuffix(".__mask__")


def _swap_bits(tensors: dict, metadata: dict) -> None:
    name = _first_sparse(tensors)
    numel = torch.Size(json.loads(metadata["shapes"])[name]).numel()
    mask = unpack_bits(tensors[name + ".__mask__"], numel).clone()
    kept, removed = int(mask.nonzero()[0]), int((~mask).nonzero()[0])
    mask[kept], mask[removed] = False, True
    tensors[name + ".__mask__"] = pack_bits(mask)


def _shape(tensors: dict, metadata: dict, shape) -> None:
    shapes = json.loads(metadata["shapes"])
    shapes[_first_sparse(tensors)] = shape
    metadata["shapes"] = json.dumps(shapes)


@pytest.mark.parametrize(("edit", "match"), [
    (_swap_bits, "differ from the checksum saved with them"),
    (lambda t, m: t.update({_first_sparse(t) + ".__mask__": t[_first_sparse(t) + ".__mask__"].float()}),
     r"mask of .* is torch\.float32 .* packed bits"),
    (lambda t, m: m.update({"shapes": "{not json"}), "'shapes' is not valid JSON"),
    (lambda t, m: m.update({"shapes": "[1, 2]"}), "'shapes' must map each sparse tensor"),
    (lambda t, m: _shape(t, m, [-32, -32]), r"shape of .* is \[-32, -32\], not a list of non-negative"),
])
def test_damaged_compact_files_are_refused_naming_the_file(tmp_path, edit, match):
    folder = compact_folder(tmp_path)
    rewrite(folder / SPARSE_WEIGHTS, edit)
    with pytest.raises(compress.CompressError, match=match) as raised:
        compress.load_sparse(folder)
    assert str(folder / SPARSE_WEIGHTS) in str(raised.value)


def test_a_truncated_compact_file_is_a_compress_error_naming_it(tmp_path):
    folder = compact_folder(tmp_path)
    path = folder / SPARSE_WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(compress.CompressError, match="truncated") as raised:
        compress.load_sparse(folder)
    assert str(path) in str(raised.value)


def test_a_compact_file_without_checksums_loads_with_a_warning(tmp_path, caplog):
    folder = compact_folder(tmp_path)
    rewrite(folder / SPARSE_WEIGHTS, lambda t, m: m.pop("checksums"))
    with caplog.at_level(logging.WARNING):
        compress.load_sparse(folder)
    assert "no checksums" in caplog.text


def test_a_compressed_tensors_sparse_checkpoint_is_refused_not_loaded_with_random_weights(tmp_path):
    """transformers 5 ignores a compressed-tensors ``sparsity_config``: the weights stored as values + bitmask
    would be newly initialised."""
    model = sparse_bert().merge_and_unload()
    model.save_pretrained(tmp_path / "ct")
    weights = tmp_path / "ct" / "model.safetensors"
    tensors = load_file(weights)
    name = "bert.encoder.layer.0.attention.self.query"
    dense = tensors.pop(name + ".weight")
    tensors.update({name + ".compressed": dense[dense != 0], name + ".bitmask": pack_bits(dense != 0),
                    name + ".shape": torch.tensor(dense.shape)})
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "version": "0.14.0",
                                     "sparsity_config": {"format": "sparse-bitmask", "global_sparsity": 0.5,
                                                         "sparsity_structure": "unstructured"}}
    (tmp_path / "ct" / "config.json").write_text(json.dumps(config))
    with pytest.raises(compress.CompressError, match=r"config\.json .* compressed-tensors .* 'sparse-bitmask'"):
        compress.make_soup([tmp_path / "ct"])


# -- meta-device models ------------------------------------------------------------------------------------------------
def test_meta_device_models_are_refused_with_the_fix(tmp_path):
    config = compress.SparseSoupConfig(task_type="SEQ_CLS", sparsity=0.5)
    with pytest.raises(compress.CompressError, match="meta device .* load the weights first"):
        get_peft_model(meta_bert(), config)
    with pytest.raises(compress.CompressError, match="meta device"):
        compress.apply_sparse_soup(meta_bert(), config)
    with pytest.raises(compress.CompressError, match=r"save_sparse .* meta device .*word_embeddings"):
        compress.save_sparse(meta_bert(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(compress.CompressError, match="ingredient #1 has .* meta device"):
        compress.make_soup([tiny.make_model("bert"), meta_bert()])


# -- soups: finite weights, scores and ingredients; arguments --------------------------------------------------------
@pytest.fixture(scope="module")
def two_ingredients():
    model = sparse_bert().merge_and_unload()
    return [model, copy.deepcopy(model)]


@pytest.mark.parametrize(("weights", "match"), [
    ([float("inf"), 1.0], "weight #0 is inf"),
    ([1e308, 1e308], "sum to inf"),
    ([True, 1], "weight #0 is True"),
    (["1", 1], "weight #0 is '1'"),
    ("11", "got str"),
])
def test_soup_weights_must_be_finite_non_negative_numbers(two_ingredients, weights, match):
    with pytest.raises(compress.CompressError, match=match):
        compress.make_soup(two_ingredients, weights=weights)


@pytest.mark.parametrize(("value", "match"), [
    (float("nan"), "scored ingredient #0 nan"),
    (float("inf"), "scored ingredient #0 inf"),
    ("good", "returned 'good'"),
])
def test_greedy_soup_refuses_a_score_that_is_not_a_finite_number(two_ingredients, value, match):
    with pytest.raises(compress.CompressError, match=match):
        compress.make_soup(two_ingredients, strategy="greedy", eval_fn=lambda model: value)


def test_greedy_soup_refuses_a_nan_score_of_a_candidate_soup(two_ingredients):
    scores = iter([1.0, 0.5, float("nan")])
    with pytest.raises(compress.CompressError, match=r"scored the soup of ingredients \[0, 1\] nan"):
        compress.make_soup(two_ingredients, strategy="greedy", eval_fn=lambda model: next(scores))


def test_soup_refuses_an_ingredient_with_non_finite_weights(two_ingredients):
    diverged = copy.deepcopy(two_ingredients[0])
    with torch.no_grad():
        diverged.classifier.weight[0, 0] = float("nan")
    with pytest.raises(compress.CompressError, match=r"ingredient #1 has 1 non-finite values .* classifier\.weight"):
        compress.make_soup([two_ingredients[0], diverged])


@pytest.mark.parametrize(("ingredients", "match"), [
    ("soup-folder", "must be a list of models, PEFT models or folders, got str"),
    (lambda models: [models[0], 3], "ingredient #1 is a int"),
])
def test_soup_ingredients_are_checked_before_any_is_loaded(two_ingredients, ingredients, match):
    ingredients = ingredients(two_ingredients) if callable(ingredients) else ingredients
    with pytest.raises(compress.CompressError, match=match):
        compress.make_soup(ingredients)


# -- run_sparse_soup: arguments checked before the first ingredient trains ---------------------------------------------
def never_trains(peft_model, **kwargs) -> None:
    raise AssertionError("an ingredient was trained before the arguments were checked")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sparsities": "0.5"}, r"sparsities must be .* got str '0\.5'"),
    ({"sparsities": [0.5, "0.7"]}, r"'0\.7' is not such a fraction"),
    ({"sparsities": [False]}, "False is not such a fraction"),
    ({"ingredients_per_cycle": 2.5}, "ingredients_per_cycle must be a whole number"),
    ({"train_fn": None}, "train_fn must be a function"),
    ({"eval_fn": 3}, "eval_fn must be a function"),
    ({"vary": {"seed": 0}}, "vary must be a list of dicts"),
    ({"strategy": "greedy"}, "strategy='greedy' chooses ingredients by eval_fn"),
    ({"strategy": "best"}, "unknown soup strategy 'best'"),
    ({"config": LoraConfig(task_type="SEQ_CLS")}, "config must be a compress.SparseSoupConfig, got LoraConfig"),
    ({"config": compress.SparseSoupConfig(task_type="SEQ_CLS", sparsity=0.5, importance="wanda")},
     "importance='wanda'"),
    ({"workdir": "FILE"}, "is a file"),
    ({"workdir": "DIR", "train_only": [5]}, r"train_only must be a list of ingredient indices in 0\.\.0"),
    ({"wait_timeout": -1}, "wait_timeout must be a positive number"),
    ({"workdir": "DIR", "tokenizer": object()}, "tokenizer must be a transformers tokenizer"),
    ({"model": "PEFT"}, "a PEFT model: merge it first"),
    ({"model": "META"}, "dense start has .* meta device"),
])
def test_run_sparse_soup_checks_every_argument_before_training(tmp_path, kwargs, match):
    (tmp_path / "file").write_text("")
    given = {"FILE": tmp_path / "file", "DIR": tmp_path / "work", "PEFT": sparse_bert(), "META": meta_bert()}
    arguments = {"model": tiny.make_model("bert"), "sparsities": [0.5], "train_fn": never_trains,
                 "ingredients_per_cycle": 1, "wait_timeout": 0.1}
    arguments.update({k: given.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()})
    with pytest.raises(compress.CompressError, match=match):
        compress.run_sparse_soup(**arguments)


# -- run_sparse_soup: a workdir belongs to one run ---------------------------------------------------------------------
def test_a_workdir_holding_another_runs_cycles_is_refused(tmp_path):
    trained = []

    def train_fn(peft_model, seed: int = 0) -> None:
        trained.append(seed)

    start = tiny.make_model("bert")

    def run(model=start, sparsities=(0.5,), **kwargs):
        return compress.run_sparse_soup(model, list(sparsities), train_fn, ingredients_per_cycle=1, workdir=tmp_path,
                                        **kwargs)

    run()
    assert trained == [0]
    assert json.loads((tmp_path / "cycle0" / "run_settings.json").read_text())["sparsities"] == [0.5]
    with pytest.raises(compress.CompressError, match=r"cycle0 was made with sparsities=\[0\.5\], this run has "
                                                     r"sparsities=\[0\.3\]"):
        run(sparsities=[0.3])
    with pytest.raises(compress.CompressError, match="cycle0 was trained from a dense model with other weights"):
        run(model=tiny.make_model("bert", seed=1))
    with pytest.raises(compress.CompressError, match="cycle0 was made with config="):
        run(config=compress.SparseSoupConfig(task_type="SEQ_CLS", sparsity=0.5, train="lora"))
    with pytest.raises(compress.CompressError, match="cycle0 was made with vary="):
        run(vary=[{"seed": 7}])
    assert trained == [0], "a refused run trained"
    run(sparsities=[0.5, 0.6])  # the same start, a longer schedule: cycle 0 is reused, cycle 1 trained
    assert trained == [0, 0]
    (tmp_path / "cycle1" / "run_settings.json").unlink()  # ingredients of unknown origin
    with pytest.raises(compress.CompressError, match="cycle1 holds ingredient0, soup but no run_settings.json"):
        run(sparsities=[0.5, 0.6])
    assert trained == [0, 0]
