"""Sparse model soups: masks as configured, masks that survive training, soups, the compact sparse format."""

from __future__ import annotations

import copy
import json
import logging
import warnings

import pytest
import torch
from compress.plugins.sparse_soup.format import SPARSE_WEIGHTS, pack_bits, unpack_bits
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import compress
from tests import tiny

sparse_soup = compress.METHODS["SPARSE_SOUP"]


def wrap(arch: str = "bert", seed: int = 0, **kwargs):
    task = {"bert": "SEQ_CLS", "roberta": "SEQ_CLS", "llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM",
            "t5": "SEQ_2_SEQ_LM"}[arch]
    kwargs.setdefault("sparsity", None if "pattern" in kwargs else 0.5)
    return get_peft_model(tiny.make_model(arch, seed=seed), compress.SparseSoupConfig(task_type=task, **kwargs))


def masks(model) -> dict[str, torch.Tensor]:
    return {name: layer.sparse_mask["default"] for name, layer in model.base_model.sparse_layers().items()}


def train(model, arch: str = "bert", steps: int = 30, lr: float = 1e-2, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    batches = tiny.make_batches(arch, 4)
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def by_key(a, b) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The tensors of two state dicts (or ``named_parameters()``) paired by name, once both hold the same names."""
    a, b = dict(a), dict(b)
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return [(name, a[name], b[name]) for name in a]


def _sparse_weight_names(model) -> list[str]:
    return [f"{name}.weight" for name in model.base_model.sparse_layers()]


# -- masks as configured ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_every_layer_loses_exactly_the_configured_fraction(arch, sparsity):
    model = wrap(arch, sparsity=sparsity)
    layers = masks(model)
    assert layers, "no layer was sparsified"
    for name, mask in layers.items():
        assert int((~mask).sum()) == round(sparsity * mask.numel()), name
    # the defaults sparsify the blocks' linear layers only: embeddings and heads stay dense
    assert all(any(part in name for part in ("layer", "block")) for name in layers)


def test_global_scope_removes_the_fraction_overall_with_uneven_layers():
    model = wrap("bert", sparsity=0.6, scope="global")
    layers = masks(model)
    removed = sum(int((~m).sum()) for m in layers.values())
    assert removed == round(0.6 * sum(m.numel() for m in layers.values()))
    # one threshold: every removed weight is smaller than every kept one
    weights = {n: model.base_model.sparse_layers()[n].get_base_layer().weight.abs() for n in layers}
    largest_removed = max(weights[n][~m].max() for n, m in layers.items())
    smallest_kept = min(weights[n][m].min() for n, m in layers.items())
    assert largest_removed <= smallest_kept


def test_a_global_threshold_that_would_empty_a_layer_is_refused():
    scores = {"large": torch.full((4, 4), 10.0), "small": torch.full((4, 4), 0.1)}
    with pytest.raises(compress.CompressError, match="removes every weight of small"):
        sparse_soup.masks_from_scores(scores, 0.5, None, "global")


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_n_m_keeps_n_weights_in_every_group_of_m(pattern):
    n, m = map(int, pattern.split(":"))
    model = wrap("llama", pattern=pattern)
    assert model.peft_config["default"].sparsity == pytest.approx(1 - n / m)
    for name, mask in masks(model).items():
        groups = mask.reshape(mask.shape[0], -1, m)
        assert (groups.sum(-1) == n).all(), name


def test_n_m_needs_whole_groups():
    with pytest.raises(compress.CompressError, match="not a multiple of m=5"):
        wrap("bert", pattern="2:5")


def test_magnitude_keeps_the_largest_weights_of_each_layer():
    model = wrap("bert", sparsity=0.5)
    for name, layer in model.base_model.sparse_layers().items():
        weight = layer.get_base_layer().weight.abs()
        mask = layer.sparse_mask["default"]
        assert weight[~mask].max() <= weight[mask].min(), name


def test_wanda_scores_weights_by_their_input_norms():
    data = tiny.make_batches("bert", 3)
    model = wrap("bert", sparsity=0.5, importance="wanda")
    # the expected scores, from the dense model's own inputs to every target layer
    dense = tiny.make_model("bert")
    squares = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: squares.__setitem__(
        n, squares.get(n, 0) + a[0].reshape(-1, a[0].shape[-1]).pow(2).sum(0)))
        for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)]
    dense.eval()
    with torch.no_grad():
        for batch in data:
            dense(**{k: v for k, v in batch.items() if k != "labels"})
    for h in handles:
        h.remove()
    model.base_model.prune(data=data)
    different = 0
    for name, mask in masks(model).items():
        plain = name.removeprefix("model.")
        weight = dict(dense.named_modules())[plain].weight.abs()
        score = weight * squares[plain].sqrt()[None, :]
        assert score[~mask].max() <= score[mask].min(), name
        different += int((mask != sparse_soup.masks_from_scores({"w": weight}, 0.5, None, "layer")["w"]).sum())
    assert different > 0, "wanda chose exactly the magnitude masks: the input norms had no effect"


def test_wanda_scores_the_base_model_and_leaves_the_adapters_as_they_were():
    data = tiny.make_batches("bert", 3)
    model = wrap("bert", sparsity=0.5, importance="wanda")
    model.base_model.prune(data=data)
    first = {name: mask.clone() for name, mask in masks(model).items()}
    torch.manual_seed(1)
    layers = model.base_model.sparse_layers()
    for layer in layers.values():
        layer.sparse_delta["default"].data.normal_(0, 1.0)  # updates that change every layer's inputs
    frozen = next(iter(layers.values())).sparse_delta["default"]
    frozen.requires_grad_(False)  # e.g. a layer the user froze: re-enabling the adapters must not unfreeze it
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.base_model.prune(data=data)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not any(layer.disable_adapters for layer in layers.values())
    for name, mask in masks(model).items():  # scored on the base weights and their inputs, as the first time
        assert torch.equal(mask, first[name]), name


def test_wanda_without_calibration_data_refuses_to_run():
    model = wrap("bert", importance="wanda")
    with pytest.raises(compress.CompressError, match="prune"):
        model(**tiny.make_batch("bert"))
    with pytest.raises(compress.CompressError, match="calibration data"):
        model.base_model.prune()
    ready = compress.apply_sparse_soup(tiny.make_model("bert"),
                                       compress.SparseSoupConfig(task_type="SEQ_CLS", sparsity=0.5,
                                                                 importance="wanda"),
                                       data=tiny.make_batches("bert", 2))
    assert ready.base_model.masks_ready
    ready(**tiny.make_batch("bert"))


# -- masks survive training ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("trained", ["weights", "lora"])
def test_pruned_weights_stay_zero_after_many_steps_and_merging(trained):
    model = wrap("bert", sparsity=0.7, train=trained, r=4)
    before = {n: m.clone() for n, m in masks(model).items()}
    base = {n: layer.get_base_layer().weight.detach().clone() for n, layer in model.base_model.sparse_layers().items()}
    train(model, steps=60)
    merged = copy.deepcopy(model).merge_and_unload()
    weights = dict(merged.named_parameters())
    for name, mask in before.items():
        weight = weights[name.removeprefix("model.") + ".weight"]
        assert torch.equal(weight == 0, ~mask), f"{name}: the zeros are not the mask"
        assert not torch.equal(weight[mask], base[name][mask]), f"{name}: the kept weights did not train"
    # the update itself is zero at pruned positions, however many steps ran
    for name, layer in model.base_model.sparse_layers().items():
        update = layer.update_weight("default").detach() * (~before[name])
        if trained == "weights":
            assert not update.any(), name


def test_the_base_weights_are_not_modified_until_merging():
    original = tiny.make_model("bert")
    model = get_peft_model(copy.deepcopy(original), compress.SparseSoupConfig(task_type="SEQ_CLS", sparsity=0.5))
    train(model, steps=5)
    restored = model.unload()
    for name, a, b in by_key(original.named_parameters(), restored.named_parameters()):
        if "classifier" not in name:
            assert torch.equal(a, b), name


# -- soups ----------------------------------------------------------------------------------------------------------
def _sparse_model(value: float, seed: int = 0, sparsity: float = 0.5):
    """A merged sparse tiny BERT whose kept block weights all equal ``value`` (same mask for every value)."""
    model = wrap("bert", seed=seed, sparsity=sparsity).merge_and_unload()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and (p == 0).any():
                p.copy_(torch.where(p == 0, torch.zeros(()), torch.full((), value)))
            else:
                p.fill_(value)
    return model


def _kept_values(model) -> set[float]:
    return {round(v, 5) for p in model.parameters() for v in p[p != 0].unique().tolist()}


def test_uniform_soup_is_the_mean_and_keeps_the_mask_bit_for_bit():
    ingredients = [_sparse_model(v) for v in (1.0, 2.0, 6.0)]
    soup = compress.make_soup(ingredients)
    assert _kept_values(soup) == {3.0}
    for name, p, q in by_key(soup.named_parameters(), ingredients[0].named_parameters()):
        assert torch.equal(p == 0, q == 0), name
    weighted = compress.make_soup(ingredients, weights=[1, 1, 0])
    assert _kept_values(weighted) == {1.5}
    assert soup.config.soup["strategy"] == "uniform"
    assert _kept_values(ingredients[0]) == {1.0}, "an ingredient was modified"


def test_greedy_soup_adds_an_ingredient_only_when_the_score_does_not_drop():
    ingredients = [_sparse_model(v) for v in (100.0, 1.0, 3.0)]

    def score(model) -> float:  # best at 2: ingredients 1 and 3 score -1 alone, their mean scores 0
        return -abs(next(iter(_kept_values(model))) - 2.0)

    soup = compress.make_soup(ingredients, strategy="greedy", eval_fn=score)
    assert _kept_values(soup) == {2.0}
    assert soup.config.soup["kept"] == [1, 2]


def test_soup_refuses_ingredients_with_different_masks_naming_the_tensor():
    other = _sparse_model(1.0, seed=1)  # another start: another mask
    with pytest.raises(compress.CompressError, match=r"different mask at bert\.encoder\.layer\.0\.attention"):
        compress.make_soup([_sparse_model(1.0), other])
    wider = wrap("bert", sparsity=0.5, target_modules=["query"]).merge_and_unload()
    with pytest.raises(compress.CompressError, match="different mask"):
        compress.make_soup([_sparse_model(1.0), wider])


def test_soup_refuses_a_different_architecture():
    with pytest.raises(compress.CompressError, match="different architecture"):
        compress.make_soup([_sparse_model(1.0), tiny.make_model("roberta")])


def test_bad_soup_arguments_are_rejected():
    ingredients = [_sparse_model(1.0), _sparse_model(2.0)]
    with pytest.raises(compress.CompressError, match="unknown soup strategy"):
        compress.make_soup(ingredients, strategy="mean")
    with pytest.raises(compress.CompressError, match="eval_fn"):
        compress.make_soup(ingredients, strategy="greedy")
    with pytest.raises(compress.CompressError, match="weights must be 2"):
        compress.make_soup(ingredients, weights=[1.0])


def test_soup_of_sparse_fine_tunes_from_peft_models_and_folders(tmp_path):
    start = tiny.make_model("bert")
    start.save_pretrained(tmp_path / "base")
    config = compress.SparseSoupConfig(task_type="SEQ_CLS", sparsity=0.5)
    runs = []
    for seed in range(3):
        run = get_peft_model(copy.deepcopy(start), config)
        train(run, steps=10, seed=seed)
        runs.append(run)
    runs[1].save_pretrained(tmp_path / "adapter")
    merged = copy.deepcopy(runs[2]).merge_and_unload()
    compress.save_pretrained(merged, tmp_path / "merged")
    reloaded = PeftModel.from_pretrained(tiny.make_model("bert"), tmp_path / "adapter")
    soup = compress.make_soup([runs[0], reloaded, str(tmp_path / "merged")])
    expected = compress.make_soup([copy.deepcopy(r).merge_and_unload() for r in runs])
    for name, a, b in by_key(soup.state_dict(), expected.state_dict()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    mask = masks(runs[0])
    weights = dict(soup.named_parameters())
    assert all(torch.equal(weights[n.removeprefix("model.") + ".weight"] == 0, ~m) for n, m in mask.items())


def test_lora_adapters_of_a_sparse_base_merge_into_a_soup_with_its_zeros(caplog):
    base = _sparse_model(0.5)
    runs = []
    for seed in range(2):
        config = LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])
        run = get_peft_model(copy.deepcopy(base), config)
        train(run, steps=5, seed=seed)
        runs.append(run)
    with caplog.at_level(logging.WARNING, logger="compress.plugins.sparse_soup.soup"):
        soup = compress.make_soup(runs)
    assert "train='lora'" in caplog.text  # the plain LoRA update fell on pruned positions, and says so
    for name, p, q in by_key(soup.named_parameters(), base.named_parameters()):
        assert torch.equal(p == 0, q == 0), name


# -- the compact sparse format ----------------------------------------------------------------------------------------
def test_bits_pack_and_unpack():
    mask = torch.rand(7, 13) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), mask.numel()).reshape(7, 13), mask)
    # the byte layout is part of saved files and adapter checksums: least significant bit first, zero padded
    assert pack_bits(torch.tensor([True] + [False] * 8 + [True])).tolist() == [1, 2]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_compact_sparse_folder_round_trips_bit_exactly_and_is_smaller(arch, tmp_path):
    model = wrap(arch, sparsity=0.7)
    train(model, arch, steps=3)
    merged = model.merge_and_unload()
    compress.save_sparse(merged, tmp_path / "sparse")
    compress.save_pretrained(merged, tmp_path / "dense")
    loaded = compress.load_sparse(tmp_path / "sparse")
    assert type(loaded) is type(merged)
    for name, a, b in by_key(merged.state_dict(), loaded.state_dict()):
        assert torch.equal(a, b), name
    dense_size = (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert (tmp_path / "sparse" / SPARSE_WEIGHTS).stat().st_size < dense_size
    soup = compress.make_soup([str(tmp_path / "sparse"), merged])  # a compact folder is an ingredient too
    assert all(torch.equal(a, b) for _, a, b in by_key(soup.state_dict(), merged.state_dict()))


def test_damaged_compact_files_fail_clearly(tmp_path):
    merged = wrap("bert", sparsity=0.5).merge_and_unload()
    compress.save_sparse(merged, tmp_path / "sparse")
    path = tmp_path / "sparse" / SPARSE_WEIGHTS
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(".__values__"))
    short = {**tensors, key: tensors[key][:-1]}
    save_file(short, path, metadata=metadata)
    with pytest.raises(compress.CompressError, match="keeps .* entries but .* values are stored"):
        compress.load_sparse(tmp_path / "sparse")
    save_file(tensors, path, metadata=metadata)
    config = json.loads((tmp_path / "sparse" / "config.json").read_text())
    config["intermediate_size"] = 32
    (tmp_path / "sparse" / "config.json").write_text(json.dumps(config))
    with pytest.raises(compress.CompressError, match="do not belong together"):
        compress.load_sparse(tmp_path / "sparse")
    with pytest.raises(compress.CompressError, match="not a compact sparse folder"):
        compress.load_sparse(tmp_path)


def test_the_moved_modules_keep_their_old_names_for_a_release_with_one_warning(monkeypatch):
    from compress.plugins.sparse_soup import cycles, soup
    from compress.plugins.sparse_soup import format as sparse_format

    for old, module in {"soup": soup, "soup_cycles": cycles, "sparse_format": sparse_format}.items():
        monkeypatch.delitem(vars(compress), old, raising=False)
        with pytest.warns(FutureWarning, match=rf"compress\.{old} moved to {module.__name__}"):
            assert getattr(compress, old) is module
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert getattr(compress, old) is module  # warned once
    with pytest.raises(AttributeError, match="no attribute 'soups'"):
        compress.soups  # noqa: B018


# -- configuration ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "names"), [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({}, "sparsity"),
    ({"sparsity": 0.5, "pattern": "4:2"}, "pattern"),
    ({"sparsity": 0.5, "pattern": "2-4"}, "pattern"),
    ({"pattern": "2:4", "sparsity": 0.7}, "sparsity"),
    ({"sparsity": 0.5, "scope": "row"}, "scope"),
    ({"sparsity": 0.5, "importance": "sparsegpt"}, "importance"),
    ({"sparsity": 0.5, "train": "bias"}, "train"),
    ({"sparsity": 0.5, "r": 0}, "r"),
    ({"sparsity": 0.5, "scope": "global", "importance": "wanda"}, "scope"),
])
def test_bad_configs_are_rejected_by_name(kwargs, names):
    with pytest.raises(compress.InvalidOptionError, match=names):
        compress.SparseSoupConfig(task_type="SEQ_CLS", **kwargs)


def test_lora_soups_are_peft_lora_layers_with_loras_options_and_keys(tmp_path):
    from peft.tuners.lora import LoraLayer

    model = wrap(train="lora", r=4, lora_alpha=8, use_rslora=True, init_lora_weights="gaussian")
    layers = model.base_model.sparse_layers()
    assert layers and all(isinstance(layer, LoraLayer) for layer in layers.values())
    query = layers["bert.encoder.layer.0.attention.self.query"]
    assert query.scaling["default"] == 8 / 2 and query.lora_A["default"].weight.abs().sum() > 0
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(".lora_B." in key for key in saved) and not any(".sparse_B." in key for key in saved)
    with pytest.raises(compress.InvalidOptionError, match="^init_lora_weights='gaussian': train='weights'"):
        compress.SparseSoupConfig(sparsity=0.5, init_lora_weights="gaussian")
    with pytest.raises(compress.InvalidOptionError, match="^use_dora=True: is a LoRA variant sparse soups"):
        compress.SparseSoupConfig(sparsity=0.5, train="lora", use_dora=True)


def test_unmerging_is_refused():
    model = wrap("bert")
    model.base_model.model.bert.encoder.layer[0].attention.self.query.merge()
    with pytest.raises(compress.CompressError, match="cannot be unmerged"):
        model.base_model.model.bert.encoder.layer[0].attention.self.query.unmerge()


# -- prune-retrain cycles -------------------------------------------------------------------------------------------
def _train_fn(peft_model, seed: int = 0, steps: int = 4) -> None:
    train(peft_model, steps=steps, seed=seed)


def _train_without_dropout(peft_model, seed: int = 0, steps: int = 4) -> None:
    """Training that uses no random numbers (the worker threads below share torch's global generator)."""
    peft_model.eval()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for batch in tiny.make_batches("bert", steps)[seed:]:  # the ingredients differ by the batches they see
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def _fixed_score(model) -> float:
    return float(sum(p.double().sum() for p in model.parameters()))


def test_cycles_raise_the_sparsity_from_the_previous_soup():
    start = tiny.make_model("bert")
    run = compress.run_sparse_soup(start, sparsities=[0.3, 0.6], train_fn=_train_fn, ingredients_per_cycle=2,
                                   eval_fn=_fixed_score)
    assert [c.sparsity for c in run.cycles] == [0.3, 0.6]
    assert all(len(c.ingredient_scores) == 2 and c.soup_score is not None for c in run.cycles)
    blocks = {n: p for n, p in run.model.named_parameters() if ".layer." in n and p.dim() == 2}
    for name, p in blocks.items():
        assert int((p == 0).sum()) == round(0.6 * p.numel()), name
    assert all((p != 0).all() for n, p in start.named_parameters() if ".layer." in n and p.dim() == 2), \
        "the dense start was modified"


def test_cycles_reject_bad_schedules():
    start = tiny.make_model("bert")
    with pytest.raises(compress.CompressError, match="non-decreasing"):
        compress.run_sparse_soup(start, sparsities=[0.6, 0.3], train_fn=_train_fn)
    with pytest.raises(compress.CompressError, match="vary has 1 entries"):
        compress.run_sparse_soup(start, sparsities=[0.5], train_fn=_train_fn, vary=[{"seed": 0}])
    with pytest.raises(compress.CompressError, match="train_only needs a workdir"):
        compress.run_sparse_soup(start, sparsities=[0.5], train_fn=_train_fn, train_only=[0])


def test_two_workers_share_a_cycle_through_the_workdir(tmp_path):
    import threading

    start = tiny.make_model("bert")
    results = {}

    def worker(index: int) -> None:
        results[index] = compress.run_sparse_soup(copy.deepcopy(start), sparsities=[0.5],
                                                  train_fn=_train_without_dropout,
                                                  ingredients_per_cycle=2, workdir=tmp_path, train_only=[index],
                                                  wait_timeout=120)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(results) == {0, 1}
    alone = compress.run_sparse_soup(copy.deepcopy(start), sparsities=[0.5], train_fn=_train_without_dropout,
                                     ingredients_per_cycle=2)
    alone_state = alone.model.state_dict()
    for name, a, b in by_key(results[0].model.state_dict(), results[1].model.state_dict()):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, alone_state[name], rtol=0, atol=1e-6, msg=name)
    assert alone_state.keys() == results[0].model.state_dict().keys()
    assert (tmp_path / "cycle0" / "ingredient1" / "model.safetensors").exists()
