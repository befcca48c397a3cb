"""bench/llm_serve_throughput.py with its hand-written server on the GPU too, as a user with a GPU would write it.

    python bench/gpu_llm_serve.py RUN_DIR [llm_serve_throughput.py's flags]      # bench/gpu_check.sh runs it

The bench's hand-written server loads the model on the CPU (it was written for this CPU-only machine); on a machine
with a GPU that would compare tuneforge on the GPU against a peer on the CPU. Here its two lines that place the model
and the inputs are changed to take `cuda` when there is one, nothing else; the results JSON records which device the
peer used ("hand_written_device").
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import llm_serve_throughput as bench  # bench/ is on sys.path: this script's folder

PATCHES = [
    ('model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()',
     'model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda" if torch.cuda.is_available() '
     'else "cpu").eval()\nprint("hand-written server: model on", model.device, model.dtype, flush=True)'),
    ('inputs = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt")',
     'inputs = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt")'
     '.to(model.device)'),
]


def main() -> int:
    import torch

    source, missing = bench.HAND_WRITTEN, []
    for old, new in PATCHES:
        if old in source:
            source = source.replace(old, new)
        else:
            missing.append(old)
    device = "cuda" if torch.cuda.is_available() and not missing else "cpu"
    if missing:
        print("gpu_llm_serve: the hand-written server's source changed; left on the CPU. Lines not found:\n  "
              + "\n  ".join(missing), flush=True)
    bench.HAND_WRITTEN = source
    rc = bench.main()
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    if out and Path(out).is_file():
        results = json.loads(Path(out).read_text())
        results["hand_written_device"] = device
        if missing:
            results["hand_written_patch_missing"] = missing
        bench.harness.write_json(Path(out), results)
    return rc


if __name__ == "__main__":
    sys.exit(main())
