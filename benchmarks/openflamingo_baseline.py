"""The reference for benchmarks/tflops.py --baseline openflamingo: open_flamingo's own model and step.

Shapes: B batch, M images per sample, T text tokens, V vocabulary rows.

The model is built by `open_flamingo.create_model_and_transforms` (open-flamingo 2.0.1) at a
megaflamingo config's shapes, offline and without weight files:
- the vision tower from an open_clip model name (an inline open_clip config is registered under
  one), `pretrained=None`: random;
- the LM from a directory holding only a transformers config.json with the config's sizes; for
  that one call the factory's `AutoModelForCausalLM.from_pretrained` is pointed at `from_config`
  (same class, random weights), so nothing the size of the LM is written or read;
- the tokenizer: a word-level one of exactly V - 3 tokens, so OpenFlamingo's additions
  (`<|endofchunk|>`, `<image>`, `<PAD>`) resize the embedding to the same V rows as ours;
- Perceiver and cross-attention sizes other than OpenFlamingo's fixed defaults are rebuilt with
  its own classes.
The step is OpenFlamingo's training step: fp32 weights with bf16 autocast on CUDA (its amp_bf16),
every embedding-gradient row zeroed except `<image>` and `<|endofchunk|>`, gradient clipping,
AdamW on the trainable set.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megaflamingo.config import Config, LMConfig


def _hf_lm_config(lm: LMConfig):
    """A transformers config with our LM's sizes (for a config-only directory)."""
    from transformers import GPTNeoXConfig, LlamaConfig, MptConfig

    D, F_ = lm.hidden_size, lm.intermediate_size or 4 * lm.hidden_size
    common = dict(vocab_size=lm.vocab_size, tie_word_embeddings=lm.tie_word_embeddings)
    if lm.family == "mpt":
        return MptConfig(d_model=D, n_heads=lm.num_heads, n_layers=lm.num_layers, expansion_ratio=F_ // D,
                         max_seq_len=lm.max_position_embeddings, vocab_size=lm.vocab_size)
    if lm.family == "llama":
        return LlamaConfig(hidden_size=D, intermediate_size=F_, num_hidden_layers=lm.num_layers,
                           num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads or lm.num_heads,
                           head_dim=lm.head_dim or D // lm.num_heads, hidden_act=lm.hidden_act,
                           rms_norm_eps=lm.norm_eps, rope_theta=lm.rope_theta,
                           attention_bias=lm.attention_bias, mlp_bias=lm.mlp_bias,
                           max_position_embeddings=lm.max_position_embeddings, **common)
    return GPTNeoXConfig(hidden_size=D, intermediate_size=F_, num_hidden_layers=lm.num_layers,
                         num_attention_heads=lm.num_heads, hidden_act=lm.hidden_act,
                         use_parallel_residual=lm.use_parallel_residual,
                         rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta,
                                          "partial_rotary_factor": lm.rotary_pct},
                         max_position_embeddings=lm.max_position_embeddings, **common)


def _word_level_tokenizer(out_dir: Path, base_len: int) -> Path:
    """A tokenizer of exactly `base_len` tokens (no pad), so OpenFlamingo's additions give V rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, base_len)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(str(out_dir))
    return out_dir


def _vision_name(cfg: Config) -> str:
    """An open_clip model name for the factory (inline configs are registered under one)."""
    import open_clip

    if cfg.model.vision.open_clip_model is not None:
        return cfg.model.vision.open_clip_model
    name = "megaflamingo-benchmark-vit"
    open_clip.factory._MODEL_CONFIGS[name] = cfg.model.vision.open_clip_config
    return name


def _match_flamingo_sizes(ref, cfg: Config) -> None:
    """The factory builds the default Perceiver and xattn sizes; rebuild them where the config differs."""
    from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler

    p, x = cfg.model.perceiver, cfg.model.xattn
    if (p.depth, p.heads, p.dim_head, p.num_latents, p.ff_mult) != (6, 8, 64, 64, 4):
        ref.perceiver = PerceiverResampler(dim=ref.vis_dim, depth=p.depth, dim_head=p.dim_head, heads=p.heads,
                                           num_latents=p.num_latents, ff_mult=p.ff_mult)
    if (x.heads, x.dim_head, x.ff_mult) != (8, 64, 4):
        lm = ref.lang_encoder
        lm.gated_cross_attn_layers = torch.nn.ModuleList(
            None if block is None else GatedCrossAttentionBlock(
                dim=ref.lang_dim, dim_visual=ref.vis_dim, dim_head=x.dim_head, heads=x.heads, ff_mult=x.ff_mult)
            for block in lm.gated_cross_attn_layers)
        lm.init_flamingo_layers(False)


class OpenFlamingoTrainer:
    """open_flamingo's model and its training step (module docstring), with the interface of
    tflops.py's trainers: forward(batch) -> loss, backward(loss), step(last).

    Args:
        cfg: the benchmark's config (model shapes, optimizer settings).
        device: where to build and train.
        workdir: a scratch directory for the config-only LM dir and the tokenizer.
    """

    pipeline = False

    def __init__(self, cfg: Config, device: torch.device, workdir: Path) -> None:
        from unittest import mock

        import open_flamingo
        from transformers import AutoConfig, AutoModelForCausalLM

        m = cfg.model
        tok_dir = _word_level_tokenizer(workdir / "tokenizer", m.vocab_size - 3)
        lm_dir = workdir / "lm"
        _hf_lm_config(m.lm).save_pretrained(str(lm_dir))

        def random_lm(path, **_):  # the factory's from_pretrained: same class, random weights
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))

        with mock.patch.object(AutoModelForCausalLM, "from_pretrained", random_lm), torch.device(device):
            ref, _, tok = open_flamingo.create_model_and_transforms(
                _vision_name(cfg), None, str(lm_dir), str(tok_dir), use_local_files=True,
                cross_attn_every_n_layers=m.cross_attn_every_n_layers,
                freeze_lm_embeddings=m.freeze_lm_embeddings)
            _match_flamingo_sizes(ref, cfg)
        self.model = ref.to(device).train()
        self.keep_rows = [tok.encode("<image>")[-1], tok.encode("<|endofchunk|>")[-1]]
        self.amp = device.type == "cuda"
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay)
        self.grad_clip = o.grad_clip
        self.name = "open_flamingo 2.0.1 (create_model_and_transforms), AdamW" + (
            ", fp32 weights + bf16 autocast" if self.amp else ", fp32")

    def forward(self, batch: dict) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            return self.model(vision_x=batch["images"], lang_x=batch["input_ids"],
                              attention_mask=batch["attention_mask"], labels=batch["labels"])[0]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        grad = self.model.lang_encoder.get_input_embeddings().weight.grad
        if grad is not None:  # OpenFlamingo trains only the <image> and <|endofchunk|> rows
            keep = torch.zeros_like(grad[:, :1])
            keep[self.keep_rows] = 1
            grad.mul_(keep)

    def step(self, last: bool) -> None:
        if not last:
            return
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def copy_reference_weights(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Give megaflamingo's model every weight of the open_flamingo model (identical weights).

    The vision tower from `ref.vision_encoder`, the LM's decoder layers from the Hugging Face
    state of `ref.lang_encoder` (OpenFlamingo's `decoder_layer` wrappers unwrapped), and the
    Perceiver, cross-attention, embedding and head through the OpenFlamingo importer. The
    reference is switched to the released models' pre-`ln_post` vision tokens, as ours uses.

    Args:
        ours: a megaflamingo Flamingo of the same shapes.
        ref: the open_flamingo model (`OpenFlamingoTrainer.model`).
    Raises:
        ValueError: a tensor has no counterpart or a different shape.
    """
    from megaflamingo.convert.openflamingo import import_openflamingo_state_dict
    from megaflamingo.models.hf_weights import hf_to_ours

    ref.vision_encoder.final_ln_after_pool = True
    ours.vision.visual.load_state_dict(ref.vision_encoder.state_dict())
    lm_state = {k.replace(".decoder_layer.", "."): v for k, v in ref.lang_encoder.state_dict().items()
                if "gated_cross_attn_layer" not in k and not k.startswith("old_decoder_blocks.")}
    missing, unexpected = ours.lm.load_state_dict(hf_to_ours(lm_state, ours.lm.cfg), strict=False)
    if unexpected or any(not k.startswith("embed_tokens.") for k in missing):
        raise ValueError(f"LM weights do not match: missing {missing}, unexpected {unexpected}")
    import_openflamingo_state_dict(ours, ref.state_dict())
