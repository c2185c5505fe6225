"""The LM family table: everything that differs between decoder families, one entry per family.

Shapes: D width, H query heads, G key/value heads, K head dim, F MLP width, V vocabulary rows.

An entry (`Family`) holds, for one family:
- the Hugging Face config.json -> `LMConfig` reader, and the `model_type`s it reads;
- the weight-name mapping (`WeightRule`s: HF module <-> our module(s), fused q/k/v split rules);
- the tensor-parallel plan: our module-path pattern -> "column" | "row" | "vocab" (the pattern
  `*` stands for one layer index; `parallel/plan.py` applies it);
- the architecture variant the decoder builds: norm, positions, gated MLP, fixed activation,
  grouped-query attention, bias rules, parallel residual;
- the FLOPs terms `models/flops.py` reads (`mlp_matrices`);
- the OpenFlamingo checkpoint facts `convert/openflamingo.py` reads.

Adding a family is one more entry in `FAMILIES`; nothing else branches on a family name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from megaflamingo.config import LMConfig

NORMS = ("rms", "layer", "layer_bias")
POSITIONS = ("rope", "alibi")
TP_STYLES = ("column", "row", "vocab")


@dataclass(frozen=True)
class WeightRule:
    """One HF module <-> our module(s). `{i}` is the layer index; .weight/.bias carry over."""

    hf: str
    ours: tuple[str, ...]
    fuse: str = ""
    """"" one-to-one; "rows": HF = cat([q, k, v]); "heads": HF = per-head [q_h; k_h; v_h]."""


@dataclass(frozen=True)
class Family:
    """One LM family: HF mapping, TP plan, architecture variant and FLOPs terms (module docstring)."""

    name: str
    model_types: tuple[str, ...]
    """HF config.json `model_type` values this entry reads."""
    read_hf_config: Callable[[dict], LMConfig]
    """config.json (parsed) -> LMConfig; raises ValueError for options we cannot build."""
    weight_rules: tuple[WeightRule, ...]
    tp_plan: Mapping[str, str]
    """Our module path pattern under the LM (`layers.*.attn.q_proj`) -> TP style."""
    norm: str
    """"rms" (RMSNorm), "layer" (LayerNorm without bias) or "layer_bias"."""
    positions: str
    """"rope" (rotary on the first rotary_pct of each head) or "alibi"."""
    gated_mlp: bool
    """down(act(gate(x)) * up(x)) when True, down(act(up(x))) otherwise."""
    activation: str | None = None
    """A fixed MLP activation (transformers name); None reads cfg.hidden_act."""
    grouped_query: bool = True
    """num_kv_heads may be smaller than num_heads."""
    qkv_bias: bool | None = None
    """q/k/v projection biases; None reads cfg.attention_bias."""
    o_bias: bool | None = None
    """Output projection bias; None reads cfg.attention_bias."""
    mlp_bias: bool | None = None
    """MLP biases; None reads cfg.mlp_bias."""
    parallel_residual: bool = False
    """cfg.use_parallel_residual is honoured (GPT-NeoX); otherwise the residual is sequential."""
    hf_aliases: Mapping[str, str] = field(default_factory=dict)
    """Checkpoint tensor names renamed before mapping (in-memory names of newer transformers)."""
    hf_mlp_width_key: str | None = None
    """A checkpoint tensor whose rows give the MLP width (overrides the config's)."""
    openflamingo_tied_head_alias: bool = False
    """OpenFlamingo checkpoints of a tied LM also carry `lm_head.weight` (= the embedding)."""
    openflamingo_writes_head: bool = False
    """OpenFlamingo checkpoints carry this family's (untied) output head."""

    @property
    def mlp_matrices(self) -> int:
        """FLOPs term: weight matrices of width D x F per MLP (3 gated, 2 plain)."""
        return 3 if self.gated_mlp else 2

    def hf_module(self, ours: str) -> str:
        """The HF module name of our (non-layer) module `ours` (e.g. "embed_tokens").

        Raises:
            KeyError: no rule maps `ours` one-to-one.
        """
        for rule in self.weight_rules:
            if rule.ours == (ours,):
                return rule.hf
        raise KeyError(f"family {self.name} has no Hugging Face name for '{ours}'")

    @property
    def hf_layers(self) -> str:
        """The HF module path of the decoder layers (e.g. "model.layers")."""
        return self.hf_module("layers.{i}.attn_norm").split(".{i}.")[0]


# ----------------------------------------------------------------------------- shared pieces


def _layer_rules(prefix: str, names: dict[str, str]) -> tuple[WeightRule, ...]:
    return tuple(WeightRule(f"{prefix}.{{i}}.{hf}", (f"layers.{{i}}.{ours}",)) for hf, ours in names.items())


_QKV = ("layers.{i}.attn.q_proj", "layers.{i}.attn.k_proj", "layers.{i}.attn.v_proj")

_ATTN_TP = {"layers.*.attn.q_proj": "column", "layers.*.attn.k_proj": "column",
            "layers.*.attn.v_proj": "column", "layers.*.attn.o_proj": "row"}
_HEAD_TP = {"embed_tokens": "vocab", "lm_head": "column"}
PLAIN_MLP_TP = {**_ATTN_TP, "layers.*.mlp.up_proj": "column", "layers.*.mlp.down_proj": "row", **_HEAD_TP}
"""TP plan of a family with separate q/k/v/o and a plain up -> down MLP."""
GATED_MLP_TP = {**PLAIN_MLP_TP, "layers.*.mlp.gate_proj": "column"}
"""TP plan of a family with separate q/k/v/o and a gated (SwiGLU) MLP."""

LLAMA_STYLE_RULES = (
    WeightRule("model.embed_tokens", ("embed_tokens",)),
    WeightRule("model.norm", ("norm",)),
    WeightRule("lm_head", ("lm_head",)),
    *_layer_rules("model.layers", {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
        "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
        "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.o_proj",
        "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj"}),
)
"""Names of LlamaForCausalLM and its descendants (Qwen2, Mistral, ...)."""


def rope_fields(raw: dict, theta_key: str = "rope_theta") -> tuple[float, dict | None, dict]:
    """(theta, rope_scaling or None, the rest) from the transformers 5 `rope_parameters` or the
    older top-level `rope_theta` / `rope_scaling` keys."""
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", raw.get(theta_key, 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    return float(theta), (None if kind == "default" else rope), rope


def common_sizes(raw: dict) -> dict:
    """The LMConfig fields every transformers-style config.json names alike."""
    return dict(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
                tie_word_embeddings=raw.get("tie_word_embeddings", False),
                max_position_embeddings=raw.get("max_position_embeddings", 2048))


# ----------------------------------------------------------------------------- llama


def _llama_config(raw: dict) -> LMConfig:
    theta, scaling, _ = rope_fields(raw)
    return LMConfig(
        family="llama", **common_sizes(raw), num_kv_heads=raw.get("num_key_value_heads"),
        head_dim=raw.get("head_dim"), intermediate_size=raw["intermediate_size"],
        norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        attention_bias=raw.get("attention_bias", False), mlp_bias=raw.get("mlp_bias", False),
        hidden_act=raw.get("hidden_act", "silu"),
    )


LLAMA = Family(
    name="llama", model_types=("llama",), read_hf_config=_llama_config, weight_rules=LLAMA_STYLE_RULES,
    tp_plan=GATED_MLP_TP, norm="rms", positions="rope", gated_mlp=True,
    openflamingo_tied_head_alias=True,
)

# ----------------------------------------------------------------------------- mpt

# MPT options transformers' MptForCausalLM silently ignores (or that change the math we build):
# (attn_config key or top-level key, the only value we accept).
_MPT_FIXED = (("alibi", True), ("qk_ln", False), ("prefix_lm", False), ("softmax_scale", None),
              ("attn_type", "multihead_attention"), ("no_bias", True), ("logit_scale", None))


def _mpt_config(raw: dict) -> LMConfig:
    attn = raw.get("attn_config") or {}
    for key, value in _MPT_FIXED:
        got = attn.get(key, raw.get(key, value))
        if got != value:
            raise ValueError(f"MPT config {key}={got!r} is not supported (only {value!r})")
    return LMConfig(
        family="mpt", vocab_size=raw["vocab_size"], hidden_size=raw["d_model"],
        num_layers=raw["n_layers"], num_heads=raw["n_heads"],
        intermediate_size=raw.get("expansion_ratio", 4) * raw["d_model"],
        norm_eps=raw.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=True,
        max_position_embeddings=raw.get("max_seq_len", 2048),
        alibi_bias_max=attn.get("alibi_bias_max", 8), qkv_clip=attn.get("clip_qkv"),
        hidden_act="gelu",
    )


MPT = Family(
    name="mpt", model_types=("mpt",), read_hf_config=_mpt_config,
    weight_rules=(
        WeightRule("transformer.wte", ("embed_tokens",)),
        WeightRule("transformer.norm_f", ("norm",)),
        WeightRule("transformer.blocks.{i}.attn.Wqkv", _QKV, fuse="rows"),
        *_layer_rules("transformer.blocks", {
            "norm_1": "attn_norm", "norm_2": "mlp_norm", "attn.out_proj": "attn.o_proj",
            "ffn.up_proj": "mlp.up_proj", "ffn.down_proj": "mlp.down_proj"}),
    ),
    tp_plan=PLAIN_MLP_TP, norm="layer", positions="alibi", gated_mlp=False, activation="gelu",
    grouped_query=False, qkv_bias=False, o_bias=False, mlp_bias=False,
    # transformers' MptMLP builds 4 * d_model whatever expansion_ratio says; MPT's own code uses
    # expansion_ratio. The weights are the truth either way.
    hf_mlp_width_key="transformer.blocks.0.ffn.up_proj.weight",
)

# ----------------------------------------------------------------------------- gpt_neox


def _gpt_neox_config(raw: dict) -> LMConfig:
    theta, scaling, rope = rope_fields(raw, theta_key="rotary_emb_base")
    pct = rope.pop("partial_rotary_factor", raw.get("rotary_pct", 0.25))
    return LMConfig(
        family="gpt_neox", **common_sizes(raw), intermediate_size=raw["intermediate_size"],
        norm_eps=raw.get("layer_norm_eps", 1e-5), rope_theta=theta,
        rope_scaling=None if scaling is None else rope, rotary_pct=float(pct),
        use_parallel_residual=raw.get("use_parallel_residual", True),
        attention_bias=raw.get("attention_bias", True), mlp_bias=True,
        hidden_act=raw.get("hidden_act", "gelu"),
    )


GPT_NEOX = Family(
    name="gpt_neox", model_types=("gpt_neox",), read_hf_config=_gpt_neox_config,
    weight_rules=(
        WeightRule("gpt_neox.embed_in", ("embed_tokens",)),
        WeightRule("gpt_neox.final_layer_norm", ("norm",)),
        WeightRule("embed_out", ("lm_head",)),
        WeightRule("gpt_neox.layers.{i}.attention.query_key_value", _QKV, fuse="heads"),
        *_layer_rules("gpt_neox.layers", {
            "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
            "attention.dense": "attn.o_proj", "mlp.dense_h_to_4h": "mlp.up_proj",
            "mlp.dense_4h_to_h": "mlp.down_proj"}),
    ),
    tp_plan=PLAIN_MLP_TP, norm="layer_bias", positions="rope", gated_mlp=False,
    grouped_query=False, mlp_bias=True, parallel_residual=True,
    hf_aliases={"lm_head.weight": "embed_out.weight"},  # transformers 5 calls the head lm_head in memory
    openflamingo_writes_head=True,
)

# ----------------------------------------------------------------------------- qwen2


def _qwen2_config(raw: dict) -> LMConfig:
    layers = raw["num_hidden_layers"]
    window = raw.get("sliding_window") if raw.get("use_sliding_window", False) else None
    kinds = raw.get("layer_types") or ["sliding_attention" if window is not None and i >= raw.get(
        "max_window_layers", 28) else "full_attention" for i in range(layers)]
    if "sliding_attention" in kinds:
        raise ValueError("Qwen2 sliding-window attention (use_sliding_window / layer_types) is not supported")
    theta, scaling, _ = rope_fields(raw)
    return LMConfig(
        family="qwen2", **common_sizes(raw), num_kv_heads=raw.get("num_key_value_heads"),
        head_dim=raw.get("head_dim"), intermediate_size=raw["intermediate_size"],
        norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        hidden_act=raw.get("hidden_act", "silu"),
    )


QWEN2 = Family(  # Qwen2 / Qwen2.5: LLaMA with q/k/v biases (no o bias), GQA, tied or untied head
    name="qwen2", model_types=("qwen2",), read_hf_config=_qwen2_config, weight_rules=LLAMA_STYLE_RULES,
    tp_plan=GATED_MLP_TP, norm="rms", positions="rope", gated_mlp=True,
    qkv_bias=True, o_bias=False, mlp_bias=False, openflamingo_tied_head_alias=True,
)

# ----------------------------------------------------------------------------- the table

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MPT, GPT_NEOX, QWEN2)}
"""Every LM family we build, by `LMConfig.family`."""


def family_of(cfg: LMConfig | str) -> Family:
    """The table entry of `cfg.family` (or of a family name).

    Raises:
        ValueError: a family not in the table.
    """
    name = cfg if isinstance(cfg, str) else cfg.family
    if name not in FAMILIES:
        raise ValueError(f"unknown LM family '{name}' (expected {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_for_model_type(model_type: str | None, where: str = "config.json") -> Family:
    """The entry that reads HF `model_type`.

    Raises:
        ValueError: no entry reads it (the message names `where`).
    """
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unsupported LM model_type '{model_type}' in {where} (supported: {supported})")
