"""Rewrites a wheel without the native libraries a machine will not load, to carry it lighter.

    python benchmarks/slim_wheel.py WHEEL KEEP_PATTERN [KEEP_PATTERN...]

bitsandbytes' manylinux wheel (~43 MB) ships one libbitsandbytes_*.so per CUDA, ROCm and XPU
release; it loads the one matching torch.version.cuda (libbitsandbytes_cuda130.so under a
CUDA 13.0 torch). This keeps every file but the .so files whose names match none of the
KEEP_PATTERNs (regular expressions), drops their lines from the wheel's RECORD, and replaces
the wheel in place. Used by benchmarks/gpu_wheels.sh.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path


def slim(wheel: Path, keep: list[str]) -> tuple[int, int]:
    """Removes the unkept native libraries; returns the sizes before and after, in bytes."""
    before = wheel.stat().st_size
    dropped = set()
    with zipfile.ZipFile(wheel) as source:
        for name in source.namelist():
            if name.endswith(".so") and not any(re.search(p, name) for p in keep):
                dropped.add(name)
        slimmed = wheel.with_suffix(".slim")
        with zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
            for info in source.infolist():
                if info.filename in dropped:
                    continue
                content = source.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = content.decode().splitlines()
                    kept = [line for line in lines if line.split(",")[0] not in dropped]
                    content = ("\n".join(kept) + "\n").encode()
                target.writestr(info, content)
    slimmed.replace(wheel)
    return before, wheel.stat().st_size


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    wheel = Path(sys.argv[1])
    before, after = slim(wheel, sys.argv[2:])
    print(f"{wheel.name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
