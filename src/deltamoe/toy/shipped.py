"""The shipped toy set: the demo size's trained models inside the package.

A good toy base takes most of an hour to train on 2 cores, so the demo's build ships with
deltamoe: ``deltamoe/_data/toy/<size>-seed<seed>/`` holds ``toy.json`` (the build's manifest, with
the sha256 of every file of the build), the tokenizer and each model's weights and configs.
:func:`materialise` turns it into a full build directory: it checks every shipped file against
its sha256, regenerates the corpora and evaluation sets (cheap and deterministic) and checks
those too, so a build from the shipped set is byte for byte the build that
``deltamoe toy build --train`` makes on the machine that made the set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from deltamoe.errors import DeltaMoEError

SHIPPED_ROOT = Path(__file__).resolve().parent.parent / "_data" / "toy"


def _rebuild_hint(size: str, seed: int) -> str:
    return (f"reinstall deltamoe, or rebuild the set with 'deltamoe toy build OUT --size {size} --seed {seed} --train' "
            f"and 'deltamoe toy ship OUT' (about 45 minutes on 2 cores)")


class ShippedToyError(DeltaMoEError):
    """The shipped toy set is missing a file, holds a corrupt one, or is from another generator."""


def shipped_dir(size: str, seed: int) -> Path | None:
    """The shipped set for (size, seed), or None if the package ships none."""
    d = SHIPPED_ROOT / f"{size}-seed{seed}"
    return d if (d / "toy.json").is_file() else None


def _shipped_files(manifest: dict[str, Any]) -> list[str]:
    """The manifest's files that ship: the tokenizer and the model directories' files."""
    models = set(manifest.get("models", []))
    return [f for f in manifest["files"] if f.split("/")[0] in models | {"tokenizer"}]


def check_shipped(shipped: Path, key: str) -> dict[str, Any]:
    """The shipped manifest, after checking its key and the sha256 of every shipped file."""
    from deltamoe.io.provenance import sha256_file

    try:
        manifest = json.loads((shipped / "toy.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShippedToyError(f"{shipped / 'toy.json'}: unreadable ({e}); reinstall deltamoe") from None
    size, seed = manifest.get("size", "?"), manifest.get("seed", 0)
    if manifest.get("key") != key:
        raise ShippedToyError(
            f"{shipped / 'toy.json'}: the shipped toy set has key {manifest.get('key')} (generator version "
            f"{manifest.get('generator_version')}) but this deltamoe builds key {key}; {_rebuild_hint(size, seed)}")
    for rel in _shipped_files(manifest):
        path = shipped / rel
        if not path.is_file():
            raise ShippedToyError(f"{path}: missing from the shipped toy set; {_rebuild_hint(size, seed)}")
        if sha256_file(path) != manifest["files"][rel]:
            raise ShippedToyError(f"{path}: sha256 does not match toy.json (corrupt shipped file); "
                                  f"{_rebuild_hint(size, seed)}")
    return manifest


def materialise(shipped: Path, tmp: Path, final: Path, cfg: Any, seed: int, key: str, progress: bool,
                command: list[str] | None) -> None:
    """Write the build of the shipped set into ``tmp`` (which becomes ``final``)."""
    from deltamoe.toy.builder import TOY_MANIFEST, _log, build_files, finish_model_dir
    from deltamoe.toy.corpora import write_corpora
    from deltamoe.toy.config import GENERATOR_VERSION
    from deltamoe.toy.world import make_world

    manifest = check_shipped(shipped, key)
    for rel in _shipped_files(manifest):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shipped / rel, tmp / rel)
    _log(progress, f"generating corpora and evaluation sets for the shipped {cfg.name} set")
    world = make_world(seed, cfg.n_people, cfg.eval_fraction, cfg.n_fresh_names)
    write_corpora(tmp, world, cfg, seed)
    made = build_files(tmp)
    wrong = sorted(f for f in set(made) | set(manifest["files"]) if made.get(f) != manifest["files"].get(f))
    if wrong:
        raise ShippedToyError(f"{shipped / 'toy.json'}: the regenerated {wrong[0]} (and {len(wrong) - 1} more) differ "
                              f"from the shipped manifest; {_rebuild_hint(cfg.name, seed)}")
    params = {"size": cfg.name, "seed": seed, "key": key, "generator_version": GENERATOR_VERSION,
              "toy_dir": str(final), "config": cfg.model_dump()}
    for name, base in manifest["base_of"].items():
        finish_model_dir(tmp / name, final, name, base, params, command)
    (tmp / TOY_MANIFEST).write_text(json.dumps({**manifest, "from_shipped": True}, indent=2, ensure_ascii=False) + "\n")


def ship(build: Path, dest: Path | None = None) -> Path:
    """Copy a trained build's shipped part (toy.json, tokenizer, model files) into the package
    (or ``dest``); returns where it went."""
    from deltamoe.io import atomic_output_dir

    manifest = json.loads((build / "toy.json").read_text())
    dest = dest or SHIPPED_ROOT / f"{manifest['size']}-seed{manifest['seed']}"
    with atomic_output_dir(dest, force=True) as tmp:
        for rel in _shipped_files(manifest):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(build / rel, tmp / rel)
        shipped_manifest = {k: v for k, v in manifest.items() if k not in ("threads", "from_shipped")}
        (tmp / "toy.json").write_text(json.dumps(shipped_manifest, indent=2, ensure_ascii=False) + "\n")
    return dest
