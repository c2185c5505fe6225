"""Run in a fresh process: load exported directories with transformers alone and record outputs.

    python tests/convert/hf_load_check.py JOBS.pt RESULTS.pt

megaflamingo, open_clip and open_flamingo are made unimportable before anything else runs (an
import of any of them raises ImportError), and HF_HUB_OFFLINE=1 is expected in the environment.
JOBS.pt: {name: {"dir", "batches": {side: (vision_x, input_ids, attention_mask)}, "max_new_tokens",
"processor": None | {"images", "texts", "max_length"}}}. RESULTS.pt: {name: {"logits": {side: ...},
"generated": {side: ...}, "dtype", "processor": {...}, "tokens": [...]}, "_blocked": [...]}.
"""

from __future__ import annotations

import sys

BLOCKED = ("megaflamingo", "open_clip", "open_flamingo")
for _name in BLOCKED:
    sys.modules[_name] = None  # `import X` now raises ImportError

import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402


def run_job(job: dict) -> dict:
    model = AutoModelForImageTextToText.from_pretrained(job["dir"], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(job["dir"], trust_remote_code=True)
    out = {"dtype": str(next(model.parameters()).dtype), "logits": {}, "generated": {},
           "tokens": processor.tokenizer.convert_ids_to_tokens([model.config.media_token_id,
                                                                 model.config.eoc_token_id]),
           "vocab": len(processor.tokenizer)}
    with torch.no_grad():
        for side, (vision_x, ids, mask) in job["batches"].items():
            out["logits"][side] = model(input_ids=ids, attention_mask=mask, vision_x=vision_x).logits.float()
    if job.get("max_new_tokens"):
        vision_x, ids, mask = job["batches"]["left"]
        calls = {"vision": 0, "lm_lengths": []}  # media encoded once; the LM sees 1 new token per step
        hooks = [model.vision.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1)),
                 model.language_model.register_forward_pre_hook(
                     lambda _, args, kwargs: calls["lm_lengths"].append(kwargs["input_ids"].shape[1]),
                     with_kwargs=True)]
        out["generated"] = model.generate(ids, vision_x=vision_x, attention_mask=mask,
                                          max_new_tokens=job["max_new_tokens"])[:, ids.shape[1]:]
        for hook in hooks:
            hook.remove()
        out["generate_calls"] = calls
    if job.get("processor"):
        spec = job["processor"]
        batch = processor(images=spec["images"], text=spec["texts"], padding="max_length",
                          max_length=spec["max_length"], truncation=True, padding_side="right")
        out["processor"] = {k: batch[k] for k in ("input_ids", "attention_mask", "vision_x")}
    return out


def main(jobs_path: str, results_path: str) -> None:
    jobs = torch.load(jobs_path, weights_only=False)
    results = {name: run_job(job) for name, job in jobs.items()}
    results["_blocked"] = [name for name in BLOCKED if sys.modules.get(name) is not None]
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
