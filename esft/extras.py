"""Optional dependencies: the features that need them import them through `require`, which names
the extra to install when one is missing.

    pip install 'esft[tune]'       # optuna + matplotlib: esft tune
    pip install 'esft[lora]'       # peft: model.init_args.lora
    pip install 'esft[qlora]'      # peft + bitsandbytes: model.init_args.lora.quantize (CUDA)
    pip install 'esft[curation]'   # datasketch, sentence-transformers (+ offline MiniLM): curation
    pip install 'esft[plots]'      # matplotlib: sweep, expert-score and curation plots
    pip install 'esft[te]'         # Transformer Engine: FP8 through TE (CUDA)
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``import module``, or an ImportError saying which extra gives it to `feature`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise ImportError(f"{feature} needs {package}, which is not installed: pip install 'esft[{extra}]'") from e
