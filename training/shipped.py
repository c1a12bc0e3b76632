"""The model shipped with the repository, for a demo (or a deployment) that should not train first.

``training/shipped/`` holds one stored model exactly as :class:`lookalike.artifacts.ModelStore`
writes it (``<version>/model.safetensors``, ``model.json``, ``curves.png``) and the split
file its card names (``splits/<sha256>.json``), plus ``README.md`` with the command that
reproduced it. :func:`install` copies it into a model store and puts it through the gate
(:meth:`lookalike.registry.Registry.propose`): in a store without a champion it becomes the
champion, recorded as any first model is; in one with a champion it is compared like any
challenger. The weights are loaded once before that, so a changed file is refused by the
card's checksum, never served. ``lookalike train`` still trains from scratch; this is only
what ``lookalike train --reuse --shipped`` (the demo, compose's ``train`` service) takes
when the store has no champion.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lookalike.artifacts import CARD_FILE, ModelCard, ModelStore
from lookalike.errors import ModelArtifactError
from lookalike.registry import Decision, Registry

SHIPPED_DIR = Path(__file__).with_name("shipped")


def shipped_version(root: Path = SHIPPED_DIR) -> str:
    """The one model version under ``root`` (a folder with a card)."""
    versions = sorted(p.name for p in root.iterdir() if (p / CARD_FILE).is_file()) if root.is_dir() else []
    if len(versions) != 1:
        raise ModelArtifactError(f"{root} should hold exactly one shipped model, found {versions or 'none'}")
    return versions[0]


def install(store: ModelStore, root: Path = SHIPPED_DIR) -> tuple[ModelCard, Decision]:
    """Copy the shipped model (and its split file) into ``store`` and propose it to the gate."""
    shipped = ModelStore(root)
    version = shipped_version(root)
    card = shipped.card(version)
    shipped.load(version)  # the weights against the card's checksum, and against its spec
    split_name = card.training.get("split_file")
    if card.data_split_sha256 and not split_name:
        raise ModelArtifactError(f"shipped model {version} names split {card.data_split_sha256[:12]} but no split file")
    if split_name:
        source = root / split_name
        if not source.is_file():
            raise ModelArtifactError(f"shipped model {version}: its split file {split_name} is not in {root}")
        target = store.root / split_name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        elif json.loads(target.read_text("utf-8")) != json.loads(source.read_text("utf-8")):
            raise ModelArtifactError(f"{target} differs from the shipped split file of the same name")
    if version not in store.versions():
        store.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=store.root, prefix=".staging-"))
        try:
            staging.chmod(0o755)  # as ModelStore.save: readable by services running as another user
            for path in (root / version).iterdir():
                shutil.copyfile(path, staging / path.name)
            staging.replace(store.root / version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    store.load(version)  # what the store now holds loads and matches its checksum
    return store.card(version), Registry(store).propose(version)
