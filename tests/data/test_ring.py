"""The workers' shared step buffers: a slot is rewritten only once nothing references it."""

from __future__ import annotations

import torch

from megaflamingo.data.ring import StepRing


def written(ring: StepRing, step: int, worker: int, value: float):
    """What worker `worker` does for `step`: its rows of the slot (filled), or None."""
    rows = ring.claim(step, worker)
    if rows is not None:
        rows.fill_(value)
    return rows


def test_slot_is_handed_out_whole_and_not_rewritten_while_referenced():
    ring = StepRing(slots=2, rows=[1, 2], image_shape=(1, 2))
    assert written(ring, 0, 0, 1.0) is not None and written(ring, 0, 1, 2.0) is not None
    images = ring.assemble(0, [None, None])
    assert images.tolist() == [[[1.0, 1.0]], [[2.0, 2.0]], [[2.0, 2.0]]]
    held = images[1:]  # the consumer keeps a view of step 0
    del images
    ring.collect()
    # step 2 maps to slot 0 again: both workers must write tensors of their own
    assert ring.claim(2, 0) is None and ring.claim(2, 1) is None
    own = [torch.full((1, 1, 2), 5.0), torch.full((2, 1, 2), 6.0)]
    assert torch.equal(ring.assemble(2, own), torch.cat(own))
    assert held.tolist() == [[[2.0, 2.0]], [[2.0, 2.0]]]  # untouched
    del held
    ring.collect()
    assert ring.claim(4, 0) is not None and ring.claim(4, 1) is not None


def test_mixed_step_is_concatenated_and_its_slot_rows_released_at_once():
    ring = StepRing(slots=1, rows=[2, 1], image_shape=(3,))
    assert written(ring, 0, 0, 7.0) is not None
    own = torch.full((1, 3), 8.0)
    images = ring.assemble(0, [None, own])  # worker 1 found its rows busy
    assert images.tolist() == [[7.0] * 3, [7.0] * 3, [8.0] * 3]
    assert written(ring, 1, 0, 9.0) is not None  # the copy freed worker 0's rows
    assert images.tolist()[0] == [7.0] * 3  # the concatenation does not alias the slot
    assert ring.claim(1, 1) is not None  # worker 1's rows were never claimed


def test_loader_steps_from_reused_slots_equal_in_process_steps(easy_vqa_dir, tokenizer_dir,
                                                                tokenizer):
    """A consumer that drops each step: slots are rewritten lap after lap, and every step (and
    the resume state) equals the in-process loader's; shapes and flips vary per step (MMC4)."""
    import itertools

    from megaflamingo.data.loader import build_stream_loader
    from tests.data.common import make_config, stream

    def steps(workers: int) -> tuple[list, dict]:
        cfg = make_config(tokenizer_dir, {
            "mmc4": stream(str(easy_vqa_dir / "mmc4/{00000..00003}.tar"), batch_size=4,
                           micro_batch_size=2, seq_len=64, max_num_media=3),
            "mmc4_options": {"min_image_bytes": 0}, "workers": workers})
        loader = build_stream_loader(cfg, "mmc4", tokenizer, 0, 1)
        copies = [[{k: v.clone() for k, v in mb.items()} for mb in step]  # views dropped here
                  for step in itertools.islice(iter(loader), 17)]  # > 3 laps of 5 slots
        return copies, loader.state_dict()

    (ours, state), (reference, ref_state) = steps(2), steps(0)
    assert state == ref_state
    for step, ref_step in zip(ours, reference, strict=True):
        for mb, ref_mb in zip(step, ref_step, strict=True):
            assert all(torch.equal(mb[k], ref_mb[k]) for k in ref_mb)
