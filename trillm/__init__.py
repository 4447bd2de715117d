"""trillm: one readable inference engine for LLaMA, BitNet b1.58 and gpt-oss.

    import trillm
    model = trillm.load("path/to/model-folder-or.gguf")   # or a Hugging Face repo id, or None
    print(model.generate([{"role": "user", "content": "Hi!"}]))
"""

import os

# Idle OpenMP threads spin by default; on a shared or small machine that steals the cores doing real
# work. Set before torch (and our kernels) start their thread pools; not in `trillm bench`'s llama.cpp
# workers, which import this package too but must run llama.cpp as its users do (bench.py).
if not os.environ.get("TRILLM_KEEP_OMP_WAIT_POLICY"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["Model", "load"]


def __getattr__(name: str):
    # Imported on first use: `trillm` (the command) starts without torch, so Ctrl-C there is one line.
    if name in __all__:
        from trillm import api

        return getattr(api, name)
    raise AttributeError(f"module 'trillm' has no attribute {name!r}")
