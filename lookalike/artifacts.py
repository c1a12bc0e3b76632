"""Self-describing model artifacts in a folder store, with aliases.

Layout of the store (``LOOKALIKE_MODEL_DIR``, default ``$LOOKALIKE_HOME/models``)::

    <version>/model.safetensors   weights, no pickle
    <version>/model.json          the model card: spec, preprocessing, classes, metrics, ...
    aliases.json                  {"champion": "<version>", ...}, replaced atomically

A folder store is what every service can reach in docker compose (a shared volume) and
on one machine; the card is what makes a file trustworthy: loaders check the weights'
checksum and refuse a card whose embedding size or preprocessing they cannot serve.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lookalike.errors import ModelArtifactError
from lookalike.imaging import PreprocessSpec
from lookalike.model import EmbeddingNet, ModelSpec

CARD_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
ALIASES_FILE = "aliases.json"
CHAMPION = "champion"


@dataclass(frozen=True)
class ModelCard:
    """What a model is, how to feed it, and how it was made."""

    version: str
    created_at: str
    spec: ModelSpec
    preprocess: PreprocessSpec
    classes: list[str]
    weights_sha256: str
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    data_split_sha256: str | None = None

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CARD_FORMAT,
            "version": self.version,
            "created_at": self.created_at,
            "embedding_dim": self.spec.embedding_dim,
            "spec": self.spec.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "classes": self.classes,
            "weights_sha256": self.weights_sha256,
            "metrics": self.metrics,
            "training": self.training,
            "data_split_sha256": self.data_split_sha256,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelCard:
        if raw.get("format") != CARD_FORMAT:
            raise ModelArtifactError(f"model card format {raw.get('format')!r} is not {CARD_FORMAT}")
        try:
            return cls(
                version=raw["version"],
                created_at=raw["created_at"],
                spec=ModelSpec.from_dict(raw["spec"]),
                preprocess=PreprocessSpec.from_dict(raw["preprocess"]),
                classes=list(raw["classes"]),
                weights_sha256=raw["weights_sha256"],
                metrics=dict(raw.get("metrics") or {}),
                training=dict(raw.get("training") or {}),
                data_split_sha256=raw.get("data_split_sha256"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelArtifactError(f"model card is malformed: {exc}") from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide it from services running as another user
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelStore:
    """A folder of versioned model artifacts with named aliases."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def save(
        self,
        model: EmbeddingNet,
        *,
        preprocess: PreprocessSpec,
        classes: list[str],
        metrics: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        data_split_sha256: str | None = None,
    ) -> ModelCard:
        """Store a trained model under a new version and return its card."""
        if preprocess.size != model.spec.input_size:
            raise ModelArtifactError(f"preprocess size {preprocess.size} != model input {model.spec.input_size}")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
        try:
            staging.chmod(0o755)  # readable by services running as another user (shared volumes)
            weights = staging / WEIGHTS_FILE
            state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
            save_file(state, str(weights))
            weights_sha = sha256_file(weights)
            now = datetime.now(UTC)
            version = f"{now:%Y%m%dT%H%M%SZ}-{weights_sha[:8]}"
            target = self.root / version
            if target.exists():  # the same weights saved again within the same second
                return self.card(version)
            card = ModelCard(
                version=version,
                created_at=now.isoformat(timespec="seconds"),
                spec=model.spec,
                preprocess=preprocess,
                classes=list(classes),
                weights_sha256=weights_sha,
                metrics=dict(metrics or {}),
                training=dict(training or {}),
                data_split_sha256=data_split_sha256,
            )
            (staging / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2) + "\n", "utf-8")
            os.replace(staging, target)
            return card
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename succeeded

    def versions(self) -> list[str]:
        """Stored versions, oldest first (versions sort by creation time)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / CARD_FILE).is_file())

    def aliases(self) -> dict[str, str]:
        path = self.root / ALIASES_FILE
        if not path.is_file():
            return {}
        return dict(json.loads(path.read_text("utf-8")))

    def set_alias(self, alias: str, version: str) -> None:
        if version not in self.versions():
            raise ModelArtifactError(f"no model version {version!r} in {self.root}")
        aliases = self.aliases()
        aliases[alias] = version
        write_atomic(self.root / ALIASES_FILE, (json.dumps(aliases, indent=2) + "\n").encode())

    def resolve(self, version_or_alias: str | None = None) -> str:
        """A version, an alias, or None for the champion -> a stored version."""
        wanted = version_or_alias or CHAMPION
        version = self.aliases().get(wanted, wanted)
        if version not in self.versions():
            raise ModelArtifactError(
                f"no model {wanted!r} in {self.root}: train one with `lookalike train` (stored: {self.versions()})"
            )
        return version

    def card(self, version_or_alias: str | None = None) -> ModelCard:
        version = self.resolve(version_or_alias)
        try:
            raw = json.loads((self.root / version / CARD_FILE).read_text("utf-8"))
        except ValueError as exc:
            raise ModelArtifactError(f"model {version}: the card is not JSON: {exc}") from exc
        card = ModelCard.from_dict(raw)
        if card.version != version:  # a card copied into another version's folder would load other weights
            raise ModelArtifactError(f"model folder {version} holds the card of {card.version}; refusing it")
        return card

    def load(self, version_or_alias: str | None = None) -> tuple[EmbeddingNet, ModelCard]:
        """Rebuild the network from its card and load verified weights (no pickle)."""
        card = self.card(version_or_alias)
        weights = self.root / card.version / WEIGHTS_FILE
        actual = sha256_file(weights)
        if actual != card.weights_sha256:
            raise ModelArtifactError(
                f"model {card.version}: weights checksum {actual[:12]} does not match the card's "
                f"{card.weights_sha256[:12]}; refusing to load"
            )
        model = EmbeddingNet(card.spec)
        state: dict[str, torch.Tensor] = load_file(str(weights))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelArtifactError(f"model {card.version}: weights do not fit its spec: {exc}") from exc
        model.eval()
        return model, card
