"""Run one `empg score` job in a fresh process and print its peak memory as JSON (the memory case of bench/run.py).

Usage: python bench/memory_child.py INPUT.parquet OUTPUT.parquet MODEL_DIR BATCH_TOKENS
       python bench/memory_child.py --load-only MODEL_DIR     (peak of loading the model alone)
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def vm_hwm_mib() -> float:
    """Peak resident set size so far (VmHWM), MiB."""
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from empg_cli.config import AdvantageConfig, ScoreConfig
    from empg_cli.pipeline import score_file

    torch.set_num_threads(2)
    if sys.argv[1] == "--load-only":
        from empg_cli.scoring import load_policy
        after_imports = vm_hwm_mib()
        load_policy(sys.argv[2], device=torch.device("cpu"), dtype=torch.float32)
        print(json.dumps({"after_imports_mib": after_imports, "vm_hwm_mib": vm_hwm_mib()}))
        return
    src, dst, model, batch_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    after_imports = vm_hwm_mib()
    started = time.perf_counter()
    score_file(Path(src), Path(dst), ScoreConfig(model=model, device="cpu", batch_tokens=batch_tokens),
               AdvantageConfig(), overwrite=True)
    print(json.dumps({"seconds": time.perf_counter() - started, "after_imports_mib": after_imports,
                      "vm_hwm_mib": vm_hwm_mib(),
                      "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
