"""Find the files of one model: a single GGUF, a split set, or a folder holding either.

Split sets follow llama.cpp's naming, `NAME-00001-of-00003.gguf`; any member may be given.
"""

from __future__ import annotations

import re
from pathlib import Path

from tandem.errors import GGUFError

SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_member_name(stem: str, no: int, count: int) -> str:
    """File name of member `no` (1-based) of a `count`-member split set."""
    return f"{stem}-{no:05d}-of-{count:05d}.gguf"


def model_files(path: str | Path) -> list[Path]:
    """The member files of the model at `path`, in split order (one file if not split)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _files_in_folder(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file or folder")
    match = SPLIT_NAME.match(path.name)
    if match is None:
        return [path]
    return _split_set(path.parent, match["stem"], int(match["count"]))


def _split_set(folder: Path, stem: str, count: int) -> list[Path]:
    if count < 1:
        raise GGUFError(f"{folder / stem}: split set claims {count} members")
    members = [folder / split_member_name(stem, no, count) for no in range(1, count + 1)]
    missing = [m.name for m in members if not m.is_file()]
    if missing:
        raise GGUFError(
            f"{folder}: split set {stem!r} has {count} members but "
            f"{len(missing)} {'is' if len(missing) == 1 else 'are'} missing: {', '.join(missing)}"
        )
    return members


def _files_in_folder(folder: Path) -> list[Path]:
    ggufs = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".gguf")
    if not ggufs:
        raise GGUFError(f"{folder}: folder holds no .gguf file")
    models: dict[str, Path] = {}  # one entry per model: the single file, or a split set's first
    for p in ggufs:
        match = SPLIT_NAME.match(p.name)
        key = f"{match['stem']} (split)" if match else p.name
        models.setdefault(key, p)
    if len(models) > 1:
        raise GGUFError(
            f"{folder}: folder holds {len(models)} models ({', '.join(sorted(models))}); "
            "give the file you mean"
        )
    return model_files(next(iter(models.values())))
