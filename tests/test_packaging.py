"""The installed wheel: everything inside the `cfmoe` namespace, no generic top-level name (`trainer`)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_the_cfmoe_namespace(tmp_path):
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*command, str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("cfmoe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"cfmoe"}, top_level
    for module in ("modeling_cfmoe/modeling_cfmoe.py", "trainer/train.py", "trainer/data/tiny.py"):
        assert f"cfmoe/{module}" in names
    assert not any(name.startswith(("cfmoe/benchmarks", "examples", "tests")) for name in names)
