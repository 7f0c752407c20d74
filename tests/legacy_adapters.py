"""Adapter folders in the format of earlier peft-compress releases, written from a model saved with the current
code (no committed binaries).

Earlier releases saved Pruning-Adapter's LoRA matrices as ``pa_A``/``pa_B`` and the sparse soup's (``train="lora"``)
as ``sparse_A``/``sparse_B``, and their configs were plain ``PeftConfig`` dataclasses with the fields listed below
(``init_weights`` where LoRA says ``init_lora_weights``).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

#: the fields of adapter_config.json as those releases wrote them, per method
OLD_CONFIG_FIELDS = {
    "PRUNING_ADAPTER": {
        "auto_mapping", "base_model_name_or_path", "checkpoint_until_pruned", "compensate_bias", "distill_weight",
        "ema_beta", "exits", "importance", "inference_mode", "init_weights", "lora_alpha", "lora_dropout", "max_keep",
        "mode", "modules_to_save", "normalize", "peft_type", "peft_version", "pruning_end_step", "pruning_interval",
        "pruning_plan", "quantize_backbone", "r", "revision", "round_to", "schedule", "scoring_steps", "sparsity",
        "structures", "target_modules", "task_type"},
    "SPARSE_SOUP": {
        "auto_mapping", "base_model_name_or_path", "importance", "inference_mode", "init_weights", "lora_alpha",
        "lora_dropout", "modules_to_save", "pattern", "peft_type", "peft_version", "r", "revision", "scope",
        "sparsity", "target_modules", "task_type", "train"},
}
#: how those releases named LoRA's matrices in adapter_model.safetensors, per method
OLD_MATRIX_NAMES = {"PRUNING_ADAPTER": ("pa_A", "pa_B"), "SPARSE_SOUP": ("sparse_A", "sparse_B")}


def save_in_old_format(peft_model, folder: Path) -> Path:
    """Save ``peft_model`` (a Pruning-Adapter or sparse-soup model) as an earlier release would have: its LoRA
    matrices under the method's old names, its config with the old fields only."""
    peft_model.save_pretrained(folder)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    config = json.loads(config_file.read_text())
    method = config["peft_type"]
    if "init_lora_weights" in config:
        config["init_weights"] = config.pop("init_lora_weights")
    config = {k: v for k, v in config.items() if k in OLD_CONFIG_FIELDS[method]}
    config_file.write_text(json.dumps(config, indent=2))
    a, b = OLD_MATRIX_NAMES[method]
    tensors = {key.replace(".lora_A.", f".{a}.").replace(".lora_B.", f".{b}."): value
               for key, value in load_file(weights_file).items()}
    save_file(tensors, weights_file, metadata={"format": "pt"})
    return folder
