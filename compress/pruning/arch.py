"""Everything peft-compress knows about each supported architecture family, in one place.

An :class:`ArchSpec` turns a model into *sites*: one :class:`AttentionSite` per attention block and one
:class:`FFNSite` per feed-forward block, each naming its linear layers and the stack/layer it belongs to.
After any structural change, :meth:`ArchSpec.refresh` re-derives every module attribute and config field
from the weight shapes, so ``forward``, ``generate`` and ``save_pretrained`` keep working. Each family also
declares what its standard config can express, its default task, the projections adapters attach to, and its
quirks. A new architecture is one new :class:`ArchSpec` subclass listed in :data:`ARCH_SPECS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compress.errors import UnsupportedModelError, UnsupportedStructureError

if TYPE_CHECKING:  # annotations only: the command line's parser reads the families without importing torch
    from collections.abc import Callable, Iterable

    from torch import nn


@dataclass
class AttentionSite:
    """One attention block: its projections and head geometry (read from the weight shapes)."""

    name: str
    stack: str
    layer: int
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int
    #: T5 computes the relative position bias once per stack and shares it across layers, so head
    #: indices must be identical in every layer of that stack.
    shared_heads_key: str | None = None
    relative_bias: nn.Embedding | None = None

    @property
    def num_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads


@dataclass
class FFNSite:
    """One feed-forward block: input projections (up/gate or wi/wi_0/wi_1) and the output projection."""

    name: str
    stack: str
    layer: int
    inputs: list[nn.Linear]
    output: nn.Linear

    @property
    def width(self) -> int:
        return self.output.in_features


@dataclass
class HiddenSite:
    """The residual stream (the hidden size): every tensor that carries it, by role.

    Removing hidden channel ``c`` removes column ``c`` of every embedding, entry ``c`` of every norm, input
    channel ``c`` of every reader and output channel ``c`` of every writer. Tied tensors (input and output
    embeddings) appear once per module and are sliced once.
    """

    embeddings: list[nn.Embedding]
    #: (norm, rescale): LayerNorm / RMSNorm modules on the stream; ``rescale`` marks RMS-style norms whose
    #: weight is multiplied by sqrt(n / kept) so that channels that are zero everywhere can go unnoticed
    norms: list[tuple[nn.Module, bool]]
    readers: list[nn.Module]
    writers: list[nn.Module]
    #: modules whose outputs *are* the stream: where a gate on the hidden channels multiplies it
    gate_points: list[nn.Module]
    #: modules torch-pruning's dependency graph is traced from to check the declared tensors
    roots: list[nn.Module]

    @property
    def width(self) -> int:
        return self.embeddings[0].embedding_dim

    def modules(self) -> list[nn.Module]:
        return [*self.embeddings, *(norm for norm, _ in self.norms), *self.readers, *self.writers]


@dataclass
class BiasFlag:
    """A config flag that gives an output projection a bias: ``flag`` (e.g. ``mlp_bias``) adds one to every layer
    ``layers(block)`` returns for each block; ``carrier`` names the projection that holds the compensation and
    ``zeros`` the others, whose biases stay zero."""

    flag: str
    layers: Callable[[nn.Module], list[nn.Module]]
    carrier: str
    zeros: str


@dataclass
class LayerStack:
    """A ``nn.ModuleList`` of transformer blocks plus how to read a block's sites."""

    name: str
    path: str
    blocks: nn.ModuleList
    #: blocks that may not be removed by depth pruning (T5's first block owns the position bias)
    protected: set[int] = field(default_factory=set)


@dataclass
class Widths:
    """The sizes a family's config fields are derived from: FFN widths, query and kv heads per site (in site order),
    blocks per stack, the hidden size and the head size (see :meth:`ArchSpec.config_fields`)."""

    ffn: list[int]
    heads: list[int]
    kv_heads: list[int]
    layers: list[int]
    hidden: int
    head_dim: int | None
    #: the blocks each stack keeps (indices before the pruning), when blocks are removed; ``None``: all of them
    kept_blocks: dict[str, list[int]] | None = None


class ArchSpec:
    """One architecture family: where its prunable structures are and what its config can express."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    #: structures whose per-layer widths the standard config of this family can express
    uniform_structures: tuple[str, ...] = ()
    #: structures supported at all (``global`` mode loads through ``import compress``)
    supported_structures: tuple[str, ...] = ()
    #: structures that must use the same width in every layer even in global mode
    uniform_only_structures: tuple[str, ...] = ()
    #: why a supported structure cannot be pruned in uniform mode (structure -> reason), for error messages
    uniform_reasons: dict[str, str] = {}
    #: the task a checkpoint is loaded for when its config names no architecture (``compress.tasks``)
    default_task: str = ""
    #: names of the attention and FFN projections: the default ``target_modules`` of adapter methods
    projection_names: tuple[str, ...] = ()
    #: whether heads are sliced by explicit head groups instead of through torch-pruning's dependency graph,
    #: which maps channel indices one-to-one across q/k/v/o (wrong for GQA's fewer kv channels and for T5's
    #: per-head position bias)
    explicit_head_groups: bool = False
    #: why blocks cannot be run one at a time on a stored calibration stream (what least-squares reconstruction
    #: does), or ``None`` when every block of the one stack takes the stream and the same other arguments
    sequential_reason: str | None = None
    #: whether every block adds its output projections' outputs to the residual stream unchanged (pre-norm
    #: blocks), so that a block's output can follow a refit of its FFN output projection, the last term it adds,
    #: without running it again
    residual_outputs: bool = False

    def __init__(self, model: nn.Module):
        self.model = model

    # -- discovery ---------------------------------------------------------------------------------
    def stacks(self) -> list[LayerStack]:
        raise NotImplementedError

    def attention_sites(self) -> list[AttentionSite]:
        raise NotImplementedError

    def ffn_sites(self) -> list[FFNSite]:
        raise NotImplementedError

    def hidden_site(self) -> HiddenSite:
        """The residual stream's tensors; families that cannot prune the hidden size raise."""
        raise UnsupportedStructureError(f"{self.family}: pruning 'hidden' is not supported")

    def _head_readers(self, attributes: dict[str, str]) -> list[nn.Module]:
        """The task head's layers that read the stream: ``{model class suffix: attribute path}``; a head this
        family does not list is refused by the dependency-graph check in compress.pruning.surgery."""
        name = type(self.model).__name__
        return [self.model.get_submodule(path) for suffix, path in attributes.items() if name.endswith(suffix)]

    def sequence_head(self) -> tuple[nn.Linear | None, nn.Linear]:
        """The sequence-classification head's layers: ``(pooling dense or None, output projection)``; models
        without such a head raise."""
        raise UnsupportedModelError(f"{type(self.model).__name__}: no sequence-classification head in the "
                                    f"{self.family} family (supported: BERT/RoBERTa and Llama/Qwen2 "
                                    "*ForSequenceClassification)")

    # -- rewriting ---------------------------------------------------------------------------------
    def remove_blocks(self, stack: LayerStack, keep: list[int]) -> None:
        """Delete every block of ``stack`` not in ``keep`` (depth pruning), then refresh."""
        blocks_before = len(stack.blocks)
        for idx in sorted(set(range(blocks_before)) - set(keep), reverse=True):
            del stack.blocks[idx]  # ModuleList renumbers its keys, so saved names stay contiguous
        self._after_blocks_removed(sorted(keep), blocks_before)
        self.refresh()

    def _after_blocks_removed(self, keep: list[int], blocks_before: int) -> None:
        """Hook for per-layer config lists that must follow the kept blocks."""

    # -- biases of the output projections ----------------------------------------------------------
    def bias_flags(self) -> dict[str, BiasFlag]:
        """The config flags that give the FFN (``"ffn"``) or attention (``"heads"``) output projections a bias,
        where the family's config has one."""
        return {}

    def _output_projections(self, kind: str) -> list[nn.Module]:
        layers = [s.output for s in self.ffn_sites()] if kind == "ffn" else [s.o for s in self.attention_sites()]
        return [layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer for layer in layers]

    def _bias_kinds(self, structures: Iterable[str]) -> list[str]:
        """The output projections (``ffn``, ``heads``) whose input channels ``structures`` remove, still without a
        bias."""
        kinds = dict.fromkeys("ffn" if s == "ffn" else "heads" for s in structures if s in ("ffn", "heads", "kv_heads"))
        return [kind for kind in kinds if any(layer.bias is None for layer in self._output_projections(kind))]

    def check_output_biases(self, structures: Iterable[str]) -> None:
        """Raise :class:`UnsupportedStructureError` unless the output projections that ``structures`` prune have a
        bias or the family's config can give them one (see :meth:`add_output_biases`); changes nothing."""
        flags = self.bias_flags()
        for kind in self._bias_kinds(structures):
            if kind not in flags:
                what = "FFN output" if kind == "ffn" else "attention output"
                model_type = base_model_type(str(getattr(self.model.config, "model_type", self.family)))
                refit = "" if self.sequential_reason else \
                    " (reconstruct='least_squares' still refits the kept weights, without a bias)"
                raise UnsupportedStructureError(
                    f"{model_type}: the {what} projections have no bias and the {model_type} config cannot give "
                    f"them one, so compensate_bias cannot be saved in a standard folder; leave compensate_bias "
                    f"out{refit}")

    def add_output_biases(self, structures: Iterable[str]) -> list[str]:
        """Give the output projections that ``structures`` prune a bias through the config flag that expresses it
        (:meth:`bias_flags`): the flag is set and every layer it covers gets a zero bias where it has none, so the
        model computes what it did and a standard folder reloads it. Returns one sentence per flag set, for the
        report and model card.

        Raises:
            UnsupportedStructureError: the config cannot express such a bias (checked before anything changes).
        """
        import torch

        self.check_output_biases(structures)
        notes = []
        for kind in self._bias_kinds(structures):
            option = self.bias_flags()[kind]
            setattr(self.model.config, option.flag, True)
            for stack in self.stacks():
                for block in stack.blocks:
                    for layer in option.layers(block):
                        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
                        if base.bias is None:
                            base.bias = torch.nn.Parameter(
                                torch.zeros(base.out_features, dtype=base.weight.dtype, device=base.weight.device),
                                requires_grad=base.weight.requires_grad)
            notes.append(f"{option.flag} enabled: {option.carrier} biases carry the compensation; {option.zeros} "
                         "biases are zero")
        return notes

    def refresh(self) -> None:
        """Re-derive module attributes and config fields from the current weight shapes."""
        raise NotImplementedError

    # -- config fields -----------------------------------------------------------------------------
    def hidden_width(self) -> int:
        """The hidden size (the width of the residual stream), read from the input embeddings."""
        return self.model.get_input_embeddings().embedding_dim

    def current_widths(self) -> Widths:
        """The model's :class:`Widths` as its weights have them now."""
        attention = self.attention_sites()
        return Widths(ffn=[s.width for s in self.ffn_sites()], heads=[s.num_heads for s in attention],
                      kv_heads=[s.num_kv_heads for s in attention], layers=[len(s.blocks) for s in self.stacks()],
                      hidden=self.hidden_width(), head_dim=attention[0].head_dim if attention else None)

    def config_fields(self, widths: Widths) -> dict[str, object]:
        """The config fields that :meth:`refresh` derives from ``widths`` (the largest width where layers differ,
        which a compact config keeps), and with ``widths.kept_blocks`` the per-layer lists that follow the kept
        blocks (:meth:`_after_blocks_removed` updates those when the blocks go); fields of structures without sites
        are left out."""
        raise NotImplementedError

    def _write_config_fields(self) -> None:
        for name, value in self.config_fields(self.current_widths()).items():
            setattr(self.model.config, name, value)

    def check_config_expresses(self, widths: Widths) -> None:
        """Raise :class:`UnsupportedStructureError` when the family's config, given the fields of ``widths``, fails
        transformers' own validation (which ``save_pretrained`` and ``from_pretrained`` run), so that a pruning
        that would leave an unsavable model is refused before it changes anything. Changes nothing."""
        import copy

        config = self.model.config
        validate = getattr(config, "validate", None)
        if validate is None:
            return
        try:
            validate()
        except Exception:  # noqa: BLE001 - the model's config is already refused as it is: not this pruning's doing
            return
        fields = self.config_fields(widths)
        planned = copy.deepcopy(config)
        for name, value in fields.items():
            setattr(planned, name, value)
        try:
            planned.validate()
        except Exception as exc:  # noqa: BLE001 - transformers' validators raise ValueError under several wrappers
            reason = str(exc.__cause__ or exc).strip()
            model_type = base_model_type(str(getattr(config, "model_type", self.family)))
            raise UnsupportedStructureError(
                f"{model_type}: after this pruning the config would not validate ({reason}), so the model could not "
                f"be saved or loaded; nothing was changed. {self.config_advice(fields, widths)}") from None

    def config_advice(self, fields: dict[str, object], widths: Widths) -> str:
        """What to prune instead when the config ``fields`` derived from ``widths`` do not validate (see
        :meth:`check_config_expresses`)."""
        return "Prune less, or other structures."

    def widths(self) -> dict[str, list[int]]:
        """Per-layer widths, e.g. ``{"ffn": [...], "heads": [...]}``, in site order."""
        out: dict[str, list[int]] = {
            "ffn": [s.width for s in self.ffn_sites()],
            "heads": [s.num_heads for s in self.attention_sites()],
        }
        kv = [s.num_kv_heads for s in self.attention_sites()]
        if kv != out["heads"]:
            out["kv_heads"] = kv
        out["layers"] = [len(s.blocks) for s in self.stacks()]
        return out

    @classmethod
    def position_limit(cls, config) -> int | None:
        """The longest input, in tokens, the model's position embeddings allow (``None``: no limit)."""
        positions = getattr(config, "max_position_embeddings", None)
        return positions if isinstance(positions, int) and positions > 0 else None

    @classmethod
    def segment_ids(cls, config, input_ids):
        """Each token's input segment (1 from the second segment on) for inputs without ``token_type_ids``, where
        the family marks a sentence pair some other way; ``None`` where it does not."""
        return None

    def fits_standard_config(self) -> bool:
        """Whether the family's standard config can express the model (same widths in every layer)."""
        attn = self.attention_sites()
        return (
            len({s.width for s in self.ffn_sites()}) <= 1
            and len({s.num_heads for s in attn}) <= 1
            and len({s.num_kv_heads for s in attn}) <= 1
        )


def _set_if_present(obj: object, name: str, value: object) -> None:
    if hasattr(obj, name):
        setattr(obj, name, value)


def _single(values: list[int]) -> int | None:
    distinct = set(values)
    if not distinct:
        return None
    if len(distinct) == 1:
        return values[0]
    # mixed widths: the config keeps the largest so standard __init__ can allocate every layer;
    # the compact loader then shrinks layers to their recorded shapes.
    return max(distinct)


class BertSpec(ArchSpec):
    family = "bert"
    model_types = ("bert", "roberta")
    # BERT derives head size as hidden_size / num_attention_heads: fewer heads cannot be expressed.
    uniform_structures = ("ffn", "layers")
    supported_structures = ("ffn", "heads", "layers", "hidden")
    uniform_reasons = {"heads": "BertConfig derives the head size as hidden_size / num_attention_heads",
                       "hidden": "BertConfig derives the head size as hidden_size / num_attention_heads"}
    default_task = "sequence-classification"
    projection_names = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")

    @classmethod
    def segment_ids(cls, config, input_ids):
        """RoBERTa's tokenizers give no token types: a pair reads ``<s> A </s></s> B </s>``, so the second segment
        is every token after the first separator (``sep_token_id``, else ``eos_token_id``). BERT's give
        ``token_type_ids``."""
        if base_model_type(str(config.model_type)) != "roberta":
            return None
        separator = getattr(config, "sep_token_id", None)
        separator = getattr(config, "eos_token_id", None) if separator is None else separator
        if separator is None:
            return None
        is_separator = (input_ids == separator).long()
        return ((is_separator.cumsum(-1) - is_separator) > 0).long()

    @classmethod
    def position_limit(cls, config) -> int | None:
        limit = super().position_limit(config)
        if limit is not None and base_model_type(str(config.model_type)) == "roberta":
            limit -= (getattr(config, "pad_token_id", None) or 0) + 1  # RoBERTa's positions start after pad
        return limit

    def _encoder(self) -> nn.Module:
        base = self.model.base_model
        if not hasattr(base, "encoder"):
            raise UnsupportedModelError(f"{type(self.model).__name__}: expected a `.encoder` on the base model")
        return base.encoder

    def stacks(self) -> list[LayerStack]:
        return [LayerStack("encoder", "encoder.layer", self._encoder().layer)]

    def attention_sites(self) -> list[AttentionSite]:
        sites = []
        for i, block in enumerate(self._encoder().layer):
            sa = block.attention.self
            sites.append(AttentionSite(f"encoder.{i}.attention", "encoder", i, sa, sa.query, sa.key, sa.value,
                                       block.attention.output.dense, sa.attention_head_size))
        return sites

    def ffn_sites(self) -> list[FFNSite]:
        return [FFNSite(f"encoder.{i}.ffn", "encoder", i, [b.intermediate.dense], b.output.dense)
                for i, b in enumerate(self._encoder().layer)]

    def hidden_site(self) -> HiddenSite:
        base = self.model.base_model
        emb = base.embeddings
        embeddings = [m for m in (emb.word_embeddings, getattr(emb, "position_embeddings", None),
                                  getattr(emb, "token_type_embeddings", None)) if m is not None]
        layers = self._encoder().layer
        # post-norm: the stream is what each LayerNorm puts out
        norms = [(emb.LayerNorm, False)] + [(n, False) for b in layers
                                            for n in (b.attention.output.LayerNorm, b.output.LayerNorm)]
        readers = [lin for b in layers for lin in (b.attention.self.query, b.attention.self.key,
                                                    b.attention.self.value, b.intermediate.dense)]
        if getattr(base, "pooler", None) is not None:
            readers.append(base.pooler.dense)  # reads the first token; its output keeps its width
        readers += self._head_readers({"RobertaForSequenceClassification": "classifier.dense"})
        writers = [lin for b in layers for lin in (b.attention.output.dense, b.output.dense)]
        return HiddenSite(embeddings, norms, readers, writers, gate_points=[n for n, _ in norms],
                          roots=[emb.word_embeddings])

    def sequence_head(self) -> tuple[nn.Linear | None, nn.Linear]:
        name = type(self.model).__name__
        if not name.endswith("ForSequenceClassification"):
            return super().sequence_head()
        head = self.model.classifier
        if hasattr(head, "out_proj"):  # RoBERTa: dense + tanh + out_proj inside the classifier
            return head.dense, head.out_proj
        return self.model.base_model.pooler.dense, head  # BERT: the pooler, then the classifier

    def refresh(self) -> None:
        cfg = self.model.config
        # A compact config records the head size when hidden_size / num_attention_heads no longer gives it;
        # modules built from that config derived the wrong one.
        recorded = getattr(cfg, "compress_head_dim", None)
        for site in self.attention_sites():
            if recorded is not None:
                site.module.attention_head_size = recorded
                site.module.scaling = recorded ** -0.5
        sites = self.attention_sites()
        for site in sites:
            site.module.num_attention_heads = site.num_heads
            site.module.all_head_size = site.q.out_features
        self._write_config_fields()
        # num_attention_heads stays: BertConfig uses it to derive the head size.
        head_dim = sites[0].head_dim if sites else None
        if head_dim is not None and head_dim * cfg.num_attention_heads != cfg.hidden_size:
            cfg.compress_head_dim = head_dim
        elif recorded is not None:
            del cfg.compress_head_dim

    def hidden_width(self) -> int:
        return self.model.base_model.embeddings.word_embeddings.embedding_dim

    def config_fields(self, widths: Widths) -> dict[str, object]:
        fields: dict[str, object] = {"num_hidden_layers": widths.layers[0], "hidden_size": widths.hidden}
        if widths.ffn:
            fields["intermediate_size"] = _single(widths.ffn)
        return fields

    def fits_standard_config(self) -> bool:
        cfg = self.model.config
        heads = cfg.num_attention_heads
        pooler = getattr(self.model.base_model, "pooler", None)
        return (super().fits_standard_config()
                and all(s.num_heads == heads and s.head_dim * heads == cfg.hidden_size for s in self.attention_sites())
                and (pooler is None or pooler.dense.out_features == cfg.hidden_size))


class LlamaSpec(ArchSpec):
    family = "llama"
    model_types = ("llama", "qwen2")
    uniform_structures = ("ffn", "heads", "kv_heads", "layers", "hidden")
    supported_structures = ("ffn", "heads", "kv_heads", "layers", "hidden")
    default_task = "causal-lm"
    projection_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    explicit_head_groups = True
    residual_outputs = True

    def bias_flags(self) -> dict[str, BiasFlag]:
        # Qwen2 builds its MLP and o_proj without a bias whatever the config says
        if base_model_type(str(self.model.config.model_type)) != "llama":
            return {}
        return {
            "ffn": BiasFlag("mlp_bias", lambda b: [b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj], "down_proj",
                            "gate_proj/up_proj"),
            "heads": BiasFlag("attention_bias", lambda b: [b.self_attn.q_proj, b.self_attn.k_proj,
                                                           b.self_attn.v_proj, b.self_attn.o_proj], "o_proj",
                              "q_proj/k_proj/v_proj"),
        }

    def _layers(self) -> nn.ModuleList:
        base = self.model.base_model
        if not hasattr(base, "layers"):
            raise UnsupportedModelError(f"{type(self.model).__name__}: expected `.layers` on the base model")
        return base.layers

    def stacks(self) -> list[LayerStack]:
        return [LayerStack("decoder", "layers", self._layers())]

    def sequence_head(self) -> tuple[nn.Linear | None, nn.Linear]:
        if not type(self.model).__name__.endswith("ForSequenceClassification"):
            return super().sequence_head()
        return None, self.model.score  # one projection of the last real token's state

    def attention_sites(self) -> list[AttentionSite]:
        return [AttentionSite(f"decoder.{i}.attention", "decoder", i, b.self_attn, b.self_attn.q_proj,
                              b.self_attn.k_proj, b.self_attn.v_proj, b.self_attn.o_proj, b.self_attn.head_dim)
                for i, b in enumerate(self._layers())]

    def ffn_sites(self) -> list[FFNSite]:
        return [FFNSite(f"decoder.{i}.ffn", "decoder", i, [b.mlp.up_proj, b.mlp.gate_proj], b.mlp.down_proj)
                for i, b in enumerate(self._layers())]

    def hidden_site(self) -> HiddenSite:
        base = self.model.base_model
        layers = self._layers()
        norms = [(n, True) for b in layers for n in (b.input_layernorm, b.post_attention_layernorm)]
        norms.append((base.norm, True))
        readers = [lin for b in layers for lin in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                                                    b.mlp.gate_proj, b.mlp.up_proj)]
        readers += self._head_readers({"ForCausalLM": "lm_head", "ForSequenceClassification": "score"})
        writers = [lin for b in layers for lin in (b.self_attn.o_proj, b.mlp.down_proj)]
        return HiddenSite([base.embed_tokens], norms, readers, writers, gate_points=[base.embed_tokens, *writers],
                          roots=[base.embed_tokens])

    def refresh(self) -> None:
        layers = self._layers()
        width = self.hidden_width()
        for block in layers:
            _set_if_present(block.mlp, "hidden_size", width)
        for i, block in enumerate(layers):
            # the KV cache is indexed by layer_idx: renumber after depth pruning
            block.self_attn.layer_idx = i
            _set_if_present(block, "layer_idx", i)
        for site in self.attention_sites():
            site.module.num_key_value_groups = site.num_heads // site.num_kv_heads
            _set_if_present(site.module, "num_heads", site.num_heads)
            _set_if_present(site.module, "num_key_value_heads", site.num_kv_heads)
        for block in layers:
            _set_if_present(block.mlp, "intermediate_size", block.mlp.down_proj.in_features)
        self._write_config_fields()
        self.model.config.rms_norm_eps = self.model.base_model.norm.variance_epsilon  # hidden pruning rescales it

    def hidden_width(self) -> int:
        return self.model.base_model.embed_tokens.embedding_dim

    def config_fields(self, widths: Widths) -> dict[str, object]:
        fields: dict[str, object] = {"num_hidden_layers": widths.layers[0], "hidden_size": widths.hidden}
        if widths.heads:
            fields.update(num_attention_heads=_single(widths.heads), num_key_value_heads=_single(widths.kv_heads),
                          head_dim=widths.head_dim)
        if widths.ffn:
            fields["intermediate_size"] = _single(widths.ffn)
        layer_types = getattr(self.model.config, "layer_types", None) or []
        kept = (widths.kept_blocks or {}).get("decoder")
        if kept is not None and len(layer_types) == len(self._layers()):
            fields["layer_types"] = [layer_types[i] for i in kept]
        return fields

    def config_advice(self, fields: dict[str, object], widths: Widths) -> str:
        config = self.model.config
        hidden, heads = fields["hidden_size"], fields.get("num_attention_heads", config.num_attention_heads)
        if not isinstance(hidden, int) or not isinstance(heads, int) or hidden % heads == 0:
            return super().config_advice(fields, widths)
        if hidden != config.hidden_size:
            return f"Keep the hidden size a multiple of the {heads} attention heads (round_to={heads})."
        # LlamaConfig requires hidden_size to be a multiple of num_attention_heads: the largest count of any layer
        counts = ", ".join(str(n) for n in range(1, config.num_attention_heads + 1) if hidden % n == 0)
        if len(set(widths.heads)) > 1:
            return (f"The config holds the largest number of heads of any layer ({heads}), which must divide the "
                    f"hidden size {hidden} (one of {counts}): cap it with max_keep, prune fewer or more heads, or "
                    "use mode='uniform' with a heads sparsity that keeps one of those counts.")
        return (f"Keep a number of attention heads per layer that divides the hidden size {hidden} (one of "
                f"{counts}) through the heads or kv_heads sparsity.")

    def _after_blocks_removed(self, keep: list[int], blocks_before: int) -> None:
        cfg = self.model.config
        if len(getattr(cfg, "layer_types", None) or []) == blocks_before:
            cfg.layer_types = [cfg.layer_types[i] for i in keep]


class T5Spec(ArchSpec):
    family = "t5"
    model_types = ("t5",)
    uniform_structures = ("ffn", "heads", "hidden")
    supported_structures = ("ffn", "heads", "hidden")
    default_task = "seq2seq"
    # wi (ReLU FFN) or wi_0/wi_1 (gated FFN): adapter methods keep the ones a model has
    projection_names = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
    explicit_head_groups = True
    # The relative position bias (and the cross-attention bias) is computed in the first block and
    # reused by every later block of the stack, with one head count from the config.
    uniform_only_structures = ("heads",)
    sequential_reason = ("T5's decoder blocks read the encoder's output, and each stack's blocks receive the position "
                         "bias its first block computes")

    def _t5(self) -> nn.Module:
        # the model that holds the stacks: the model itself (T5Model, T5ForConditionalGeneration, ...) or its
        # `transformer` (T5ForSequenceClassification, T5ForTokenClassification)
        return self.model.base_model

    def stacks(self) -> list[LayerStack]:
        out = []
        for name in ("encoder", "decoder"):
            stack = getattr(self._t5(), name, None)
            if stack is not None:
                out.append(LayerStack(name, f"{name}.block", stack.block, protected={0}))
        return out

    def attention_sites(self) -> list[AttentionSite]:
        sites = []
        for stack in self.stacks():
            for i, block in enumerate(stack.blocks):
                sa = block.layer[0].SelfAttention
                sites.append(AttentionSite(
                    f"{stack.name}.{i}.self_attention", stack.name, i, sa, sa.q, sa.k, sa.v, sa.o,
                    sa.key_value_proj_dim, shared_heads_key=f"{stack.name}.self",
                    relative_bias=getattr(sa, "relative_attention_bias", None)))
                if stack.name == "decoder":
                    ca = block.layer[1].EncDecAttention
                    sites.append(AttentionSite(
                        f"decoder.{i}.cross_attention", "decoder", i, ca, ca.q, ca.k, ca.v, ca.o,
                        ca.key_value_proj_dim))
        return sites

    def ffn_sites(self) -> list[FFNSite]:
        sites = []
        for stack in self.stacks():
            for i, block in enumerate(stack.blocks):
                ff = block.layer[-1].DenseReluDense
                inputs = [ff.wi] if hasattr(ff, "wi") else [ff.wi_0, ff.wi_1]
                sites.append(FFNSite(f"{stack.name}.{i}.ffn", stack.name, i, inputs, ff.wo))
        return sites

    def hidden_site(self) -> HiddenSite:
        t5 = self._t5()
        stacks = [getattr(t5, name) for name in ("encoder", "decoder") if getattr(t5, name, None)]
        embeddings = list(dict.fromkeys([m for m in (getattr(t5, "shared", None),
                                                     *(stack.embed_tokens for stack in stacks)) if m is not None]))
        # T5ForConditionalGeneration multiplies the decoder output by d_model ** -0.5 before its (tied) LM
        # head; the smaller d_model then makes up for what a rescaled final norm would add
        scaled_head = hasattr(self.model, "lm_head") and getattr(self.model.config, "scale_decoder_outputs", False)
        norms, readers, writers = [], [], []
        for stack in stacks:
            for block in stack.block:
                for layer in block.layer:
                    norms.append((layer.layer_norm, True))
                    attention = getattr(layer, "SelfAttention", None) or getattr(layer, "EncDecAttention", None)
                    if attention is not None:
                        readers += [attention.q, attention.k, attention.v]
                        writers.append(attention.o)
                    else:
                        ff = layer.DenseReluDense
                        readers += [ff.wi] if hasattr(ff, "wi") else [ff.wi_0, ff.wi_1]
                        writers.append(ff.wo)
            norms.append((stack.final_layer_norm, not (stack.is_decoder and scaled_head)))
        readers += self._head_readers({"ForConditionalGeneration": "lm_head"})
        gate_points = [*(stack.embed_tokens for stack in stacks), *writers]
        return HiddenSite(embeddings, norms, readers, writers, gate_points=gate_points,
                          roots=[stack.embed_tokens for stack in stacks])

    def refresh(self) -> None:
        t5 = self._t5()
        width = self.hidden_width()
        _set_if_present(self.model, "model_dim", width)
        for site in self.attention_sites():
            site.module.n_heads = site.num_heads
            site.module.inner_dim = site.q.out_features
            _set_if_present(site.module, "d_model", width)
        self._write_config_fields()
        # hidden pruning rescales it
        self.model.config.layer_norm_epsilon = t5.encoder.final_layer_norm.variance_epsilon

    def hidden_width(self) -> int:
        return self._t5().shared.embedding_dim

    def config_fields(self, widths: Widths) -> dict[str, object]:
        fields: dict[str, object] = {"d_model": widths.hidden}
        if widths.heads:
            fields["num_heads"] = _single(widths.heads)
        if widths.ffn:
            fields["d_ff"] = _single(widths.ffn)
        return fields


ARCH_SPECS: tuple[type[ArchSpec], ...] = (BertSpec, LlamaSpec, T5Spec)


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCH_SPECS for t in a.model_types)


def spec_class(model_type: str) -> type[ArchSpec] | None:
    """The :class:`ArchSpec` subclass for a config's ``model_type`` (compact types included), or ``None``."""
    base = base_model_type(model_type or "")
    return next((cls for cls in ARCH_SPECS if base in cls.model_types), None)


def base_model_type(model_type: str) -> str:
    """``compressed_bert`` -> ``bert``, ``multi_exit_compressed_bert`` -> ``bert``: compact and multi-exit
    models keep their family's adapter."""
    return model_type.removeprefix("multi_exit_").removeprefix("compressed_")


def arch_spec(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of ``model``, or :class:`UnsupportedModelError` naming what is supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "") or ""
    cls = spec_class(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"model_type {base_model_type(model_type) or type(model).__name__!r} is not supported for structured "
            f"pruning; supported model types: {', '.join(supported_model_types())}")
    return cls(model)

