"""The declarative tensor-parallel plan: what it swaps for every family, and its errors (no ranks needed)."""

from __future__ import annotations

import pytest
import torch.nn as nn

from megaflamingo.models.families import FAMILIES
from megaflamingo.parallel.plan import flamingo_tp_plan, match_plan
from tests.parallel.cases import FAMILIES as CASE_FAMILIES
from tests.parallel.cases import build_tiny_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_shards_every_lm_and_xattn_linear_and_nothing_else(family):
    if family not in CASE_FAMILIES:
        pytest.skip(f"no tiny parallel case for {family}")
    model = build_tiny_model(family)
    matched = match_plan(model, flamingo_tp_plan(model))
    linears = {path for path, m in model.named_modules()
               if isinstance(m, nn.Linear) and path.startswith(("lm.", "xattn."))}
    assert set(matched) == linears | {"lm.embed_tokens"}
    assert matched["lm.embed_tokens"] == "vocab"
    for path, style in matched.items():
        leaf = path.rsplit(".", 1)[-1]
        if leaf in ("o_proj", "down_proj", "to_out", "down"):
            assert style == "row", path
        elif leaf == "to_kv":
            assert style == "column_kv", path
        elif path != "lm.embed_tokens":
            assert style == "column", path


def test_unknown_style_is_a_clear_error():
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match="unknown style 'diagonal'"):
        match_plan(model, {"lm.layers.*.attn.q_proj": "diagonal"})


def test_star_matches_one_path_segment_only():
    model = build_tiny_model("llama")
    assert set(match_plan(model, {"lm.*.0.attn.q_proj": "column"})) == {"lm.layers.0.attn.q_proj"}
    assert match_plan(model, {"lm.*.attn.q_proj": "column"}) == {}
