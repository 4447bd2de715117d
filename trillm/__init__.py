"""trillm: one readable inference engine for LLaMA, BitNet b1.58 and gpt-oss.

    import trillm
    model = trillm.load("path/to/model-folder-or.gguf")   # or a Hugging Face repo id, or None
    print(model.generate([{"role": "user", "content": "Hi!"}]))
"""

import os
import sys
import warnings

# Idle OpenMP threads spin by default; on a shared or small machine that steals the cores doing real
# work. Set before torch (and our kernels) start their thread pools; not in `trillm bench`'s llama.cpp
# workers, which import this package too but must run llama.cpp as its users do (bench.py). OpenMP reads
# it when torch loads it, so a torch imported first keeps spinning: say so.
if not os.environ.get("TRILLM_KEEP_OMP_WAIT_POLICY"):
    if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        warnings.warn("trillm: torch was imported first, so its idle OpenMP threads spin and slow trillm's kernels "
                      "(10-35% on 2 cores): import trillm before torch, or set OMP_WAIT_POLICY=PASSIVE",
                      RuntimeWarning, stacklevel=2)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["Model", "load"]


def __getattr__(name: str):
    # Imported on first use: `trillm` (the command) starts without torch, so Ctrl-C there is one line.
    if name in __all__:
        from trillm import api

        return getattr(api, name)
    raise AttributeError(f"module 'trillm' has no attribute {name!r}")
