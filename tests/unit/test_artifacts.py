"""The model store: self-describing artifacts, checksums and aliases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lookalike.artifacts import CARD_FILE, CHAMPION, WEIGHTS_FILE, ModelCard, ModelStore
from lookalike.errors import ModelArtifactError
from lookalike.imaging import PreprocessSpec
from lookalike.model import EmbeddingNet, ModelSpec

SPEC = ModelSpec(input_size=16, channels=(4, 8), embedding_dim=8, num_classes=3, dropout=0.0)
PREPROCESS = PreprocessSpec(size=16)


def tiny_model(seed: int) -> EmbeddingNet:
    torch.manual_seed(seed)
    return EmbeddingNet(SPEC).eval()


def save(store: ModelStore, seed: int = 0, **kwargs: object) -> tuple[EmbeddingNet, ModelCard]:
    model = tiny_model(seed)
    card = store.save(model, preprocess=PREPROCESS, classes=["a", "b", "c"], **kwargs)  # type: ignore[arg-type]
    return model, card


def test_round_trip_gives_identical_embeddings_and_card(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    model, card = save(
        store, metrics={"precision_at_5": 0.8}, training={"epochs": 2}, data_split_sha256="ab" * 32
    )
    loaded, loaded_card = store.load(card.version)
    inputs = torch.randn(5, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(model.embed(inputs), loaded.embed(inputs))
    assert loaded_card == card
    assert loaded_card.embedding_dim == 8
    assert loaded_card.preprocess == PREPROCESS
    assert loaded_card.metrics == {"precision_at_5": 0.8}
    assert loaded_card.data_split_sha256 == "ab" * 32
    assert not loaded.training  # loaded in eval mode: dropout and batch norm frozen
    assert sorted(p.name for p in (store.root / card.version).iterdir()) == [CARD_FILE, WEIGHTS_FILE]


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _, card = save(store)
    weights = tmp_path / card.version / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit in the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelArtifactError, match="checksum"):
        store.load(card.version)


def test_a_card_whose_spec_does_not_fit_the_weights_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _, card = save(store)
    path = tmp_path / card.version / CARD_FILE
    raw = json.loads(path.read_text("utf-8"))
    raw["spec"]["embedding_dim"] = 16
    path.write_text(json.dumps(raw), "utf-8")
    with pytest.raises(ModelArtifactError, match="do not fit"):
        store.load(card.version)


def test_an_unknown_card_format_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _, card = save(store)
    path = tmp_path / card.version / CARD_FILE
    raw = json.loads(path.read_text("utf-8"))
    raw["format"] = 99
    path.write_text(json.dumps(raw), "utf-8")
    with pytest.raises(ModelArtifactError, match="format"):
        store.card(card.version)


def test_preprocess_size_must_match_the_model_input(tmp_path: Path) -> None:
    with pytest.raises(ModelArtifactError, match="preprocess size"):
        ModelStore(tmp_path).save(tiny_model(0), preprocess=PreprocessSpec(size=32), classes=["a", "b", "c"])


def test_aliases_name_versions(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.versions() == [] and store.aliases() == {}
    with pytest.raises(ModelArtifactError, match="lookalike train"):
        store.load()  # no champion yet
    _, first = save(store, seed=1)
    _, second = save(store, seed=2)
    assert set(store.versions()) == {first.version, second.version}

    store.set_alias(CHAMPION, first.version)
    store.set_alias("candidate", second.version)
    assert store.aliases() == {CHAMPION: first.version, "candidate": second.version}
    assert store.resolve() == first.version
    assert store.load()[1].version == first.version
    assert store.load("candidate")[1].version == second.version
    assert store.resolve(second.version) == second.version

    store.set_alias(CHAMPION, second.version)
    assert store.card().version == second.version
    with pytest.raises(ModelArtifactError):
        store.set_alias(CHAMPION, "no-such-version")
    assert store.resolve() == second.version  # a refused alias leaves the old one
    with pytest.raises(ModelArtifactError):
        store.resolve("no-such-alias")


def test_saving_the_same_weights_twice_is_harmless_and_leaves_no_staging(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    _, first = save(store, seed=5)
    _, second = save(store, seed=5)  # same weights; likely within the same second
    assert second.weights_sha256 == first.weights_sha256
    assert store.load(second.version)[1].weights_sha256 == first.weights_sha256
    assert not list(store.root.glob(".staging-*"))


def test_stored_files_are_readable_by_other_users(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    _, card = save(store)
    store.set_alias(CHAMPION, card.version)
    assert (store.root / card.version).stat().st_mode & 0o055 == 0o055
    assert (store.root / "aliases.json").stat().st_mode & 0o044 == 0o044


def test_a_card_in_another_versions_folder_or_not_json_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _, card = save(store)
    other = tmp_path / "20990101T000000Z-deadbeef"
    other.mkdir()
    (other / CARD_FILE).write_text((tmp_path / card.version / CARD_FILE).read_text("utf-8"), "utf-8")
    (other / WEIGHTS_FILE).write_bytes((tmp_path / card.version / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ModelArtifactError, match="holds the card of"):
        store.load(other.name)
    (other / CARD_FILE).write_text("{not json", "utf-8")
    with pytest.raises(ModelArtifactError, match="not JSON"):
        store.card(other.name)
