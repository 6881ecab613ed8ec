"""The wheel `pip install empg` builds holds the whole package, not only what an editable install happens to see."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    source = tmp_path / "source"  # a copy of what the build reads, so it leaves nothing in the checkout
    for name in ("empg_cli", "schemas"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(tmp_path), str(source)], check=True)
    (wheel,) = tmp_path.glob("empg-*.whl")
    packaged = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("empg_cli/")}
    files = [file for file in (source / "empg_cli").rglob("*") if file.is_file()]  # through the schemas link
    missing = sorted({str(file.relative_to(source)) for file in files} - packaged)
    assert len(files) > 30 and not missing, missing
