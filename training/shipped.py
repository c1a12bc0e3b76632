"""The model shipped with the repository, for a demo (or a deployment) that should not train first.

``training/shipped/`` holds one stored model exactly as :class:`lookalike.artifacts.ModelStore`
writes it (``<version>/model.safetensors``, ``model.json``, ``curves.png``) and the split
file its card names (``splits/<sha256>.json``), plus ``README.md`` with the command that
reproduced it. :func:`install` copies it into a model store and puts it through the gate
(:meth:`lookalike.registry.Registry.propose`): in a store without a champion it becomes the
champion, recorded as any first model is; in one with a champion it is compared like any
challenger. The weights are loaded once before that, so a changed file is refused by the
card's checksum, never served. ``lookalike train`` still trains from scratch; this is only
what ``lookalike train --reuse --shipped`` (the demo, compose's ``model`` service) takes
when the store has no champion.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lookalike.artifacts import CARD_FILE, WEIGHTS_FILE, ModelCard, ModelStore, sha256_file
from lookalike.errors import ModelArtifactError
from lookalike.registry import Decision, Registry
from training.evaluate import load_split

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
    split = load_split(shipped, card.training, card.data_split_sha256)  # checked against the card's checksum
    split.save(store.root / card.training.get("split_file", f"splits/{split.sha256}.json"))  # as train() saves it
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
    if sha256_file(store.root / version / WEIGHTS_FILE) != card.weights_sha256:  # the copy is what was loaded
        raise ModelArtifactError(f"model {version} in {store.root}: its weights differ from the shipped ones")
    return store.card(version), Registry(store).propose(version)
