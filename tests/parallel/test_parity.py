"""Every parallel layout trains like the single-process model: same loss at every step, same
updated trainable parameters (gathered from the shards), for a LLaMA (GQA, untied head) and an MPT
(ALiBi, tied head) Flamingo (and GPT-NeoX and Qwen2 for TP2 and PP2), 3 AdamW steps in fp32 on
one global batch whose samples carry 0, 1 or 2 real images (one whole micro-batch has none: it
must neither hang nor change the numbers).

One spawn per world size runs all its layouts in turn (`cases.run_layouts`); the tests below
only read the results. See `cases` for why updated parameters also pin the gradients.

Every layout builds its model the way training does (`build_rank_local_model`: only the rank's
stage and TP shards), watched (`watch.BuildWatch`): no rank creates a parameter it does not hold
nor writes a tensor of the full shape of a TP-sharded parameter; the old full-model build, watched
the same way on the TP2 and PP2 layouts, is caught.
"""

from __future__ import annotations

import pytest

from tests.parallel.cases import FAMILIES, Layout, reference_run, rel_err, run_layouts, with_family
from tests.parallel.harness import run_ranks

pytestmark = pytest.mark.distributed

PARITY = {
    2: [Layout("tp2", tp=2, check_old_path=True), Layout("dp2-zero1", zero=1), Layout("dp2-zero2", zero=2),
        Layout("dp2-zero3", zero=3, record_partitions=True), Layout("pp2", pp=2, check_old_path=True)],
    4: [Layout("tp2-dp2-zero3", tp=2, zero=3), Layout("pp4", pp=4)],
    8: [Layout("tp2-pp2-dp2-zero1", tp=2, pp=2, zero=1)],
}
EXTRA = {  # LLaMA only: options that must not change the numbers, and the ZeRO-3 partitions on 4 ranks
    2: [Layout("tp2-zero1-checkpointing", tp=2, zero=1, checkpointing=True),
        Layout("dp2-zero3-checkpointing", zero=3, checkpointing=True),
        Layout("pp2-explicit-partition-checkpointing", pp=2, zero=1, checkpointing=True, partition=(3,))],
    4: [Layout("dp4-zero3", zero=3, record_partitions=True)],
    8: [],
}
NEOX = {2: [Layout("tp2", tp=2), Layout("pp2", pp=2)], 4: [], 8: []}  # GPT-NeoX: the TP plan and stages
QWEN2 = {2: [Layout("tp2", tp=2), Layout("pp2", pp=2)], 4: [], 8: []}  # Qwen2: one family-table entry
BF16 = {2: [Layout("dp2-zero1-bf16", zero=1, precision="bf16"), Layout("pp2-bf16", pp=2, precision="bf16")],
        4: [], 8: []}


def layouts_for(world: int) -> list[Layout]:
    per_family = [l for family in ("llama", "mpt") for l in with_family(PARITY[world], family)]
    return (per_family + with_family(EXTRA[world] + BF16[world], "llama") + with_family(NEOX[world], "gpt_neox")
            + with_family(QWEN2[world], "qwen2"))


CASES = [(world, layout) for world in PARITY for layout in layouts_for(world)]


@pytest.fixture(scope="module")
def references() -> dict:
    return {family: reference_run(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def results():
    """world size -> per-rank results of all its layouts (spawned once, on first use)."""
    cache: dict[int, object] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            try:
                cache[world] = run_ranks(run_layouts, world, layouts_for(world))
            except Exception as err:  # every test of this world reports the same failure
                cache[world] = err
        if isinstance(cache[world], Exception):
            raise cache[world]
        return cache[world]

    return get


def check_parity(ranks: list[dict], name: str, ref: dict, tol: float = 1e-5, delta_tol: float = 1e-2) -> None:
    """Losses of every rank and every parameter any rank holds match the reference.

    Parameters: relative error <= tol; their updates (after - before) <= delta_tol, which is what
    shows the gradients match.
    """
    covered = set()
    for rank, result in enumerate(ranks):
        run = result[name]
        for step, (got, want) in enumerate(zip(run["losses"], ref["losses"], strict=True)):
            assert abs(got - want) <= tol * abs(want), f"rank {rank} step {step}: loss {got} != {want}"
        for param, value in run["params"].items():
            assert param in ref["params"], f"rank {rank}: unexpected parameter {param}"
            err = rel_err(value, ref["params"][param])
            assert err <= tol, f"rank {rank} {param}: relative error {err:.2e}"
            before = ref["initial"][param]
            delta_err = rel_err(value - before, ref["params"][param] - before)
            assert delta_err <= delta_tol, f"rank {rank} {param}: update differs by {delta_err:.2e}"
            covered.add(param)
        assert run["frozen_with_grad"] == 0, f"rank {rank}: frozen parameters hold gradients"
    assert covered == set(ref["params"]), f"parameters no rank returned: {set(ref['params']) - covered}"


@pytest.mark.parametrize("world,layout", [c for c in CASES if c[1].precision == "fp32"],
                         ids=lambda v: v.name if isinstance(v, Layout) else f"{v}ranks")
def test_layout_matches_single_process(world: int, layout: Layout, results, references) -> None:
    check_parity(results(world), layout.name, references[layout.family])


@pytest.mark.parametrize("world,layout", CASES, ids=lambda v: v.name if isinstance(v, Layout) else f"{v}ranks")
def test_each_rank_builds_only_its_share(world: int, layout: Layout, results) -> None:
    from tests.parallel.cases import build_tiny_model

    whole = sum(p.numel() for p in build_tiny_model(layout.family).parameters())
    for rank, result in enumerate(results(world)):
        run = result[layout.name]
        assert run["build_problems"] == [], f"rank {rank}: {run['build_problems']}"
        if layout.tp > 1 or layout.pp > 1:
            assert run["held_numel"] < whole, (rank, run["held_numel"], whole)
        else:
            assert run["held_numel"] == whole
        if layout.check_old_path:  # the watch catches a full-model build
            assert run["old_path_problems"], f"rank {rank}: the old build was not caught"


@pytest.mark.parametrize("world,layout", [c for c in CASES if c[1].precision == "bf16"],
                         ids=lambda v: v.name if isinstance(v, Layout) else f"{v}ranks")
def test_bf16_trains_close_to_fp32(world: int, layout: Layout, results, references) -> None:
    ref = references[layout.family]
    for rank, result in enumerate(results(world)):
        run = result[layout.name]
        for step, (got, want) in enumerate(zip(run["losses"], ref["losses"], strict=True)):
            assert abs(got - want) <= 2e-2 * abs(want), f"rank {rank} step {step}: bf16 loss {got} vs {want}"
        assert run["frozen_with_grad"] == 0


@pytest.mark.parametrize("world,name", [(2, "llama:dp2-zero3"), (2, "mpt:dp2-zero3"), (4, "llama:dp4-zero3")])
def test_zero3_shards_trainable_state_and_leaves_frozen_alone(world: int, name: str, results, references) -> None:
    """Per-rank trainable parameters, fp32 masters and Adam moments are ~1/dp of the whole."""
    family = name.split(":")[0]
    ref_params = references[family]["params"]
    full = sum(p.numel() for p in ref_params.values())
    slack = len(ref_params) * world  # each parameter's partition is padded to a multiple of dp
    for rank, result in enumerate(results(world)):
        part = result[name]["partitions"]
        assert part["trainable_full"] == full
        assert full / world <= part["trainable_local"] <= full / world + slack, (rank, part)
        assert part["fp32_master_local"] == part["trainable_local"], (rank, part)
        assert part["adam_state_local"] == 2 * part["trainable_local"], (rank, part)  # exp_avg, exp_avg_sq
        assert part["frozen_with_grad"] == 0 and part["frozen_in_optimizer"] == 0, (rank, part)
        assert part["frozen_local"] <= part["frozen_full"] / world + part["frozen_count"] * world, (rank, part)
