"""Reading catalog folders: the Kaggle styles.csv quirks and plain image folders."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from lookalike.catalog import CatalogItem, iter_catalog, metadata_from_style, read_styles

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


def write_image(path: Path, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path, fmt)


def write_kaggle(folder: Path, rows: list[str], with_images: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "styles.csv").write_text("\n".join([HEADER, *rows]) + "\n", "utf-8")
    for item_id in with_images:
        write_image(folder / "images" / f"{item_id}.jpg")
    return folder


def test_read_styles_joins_unquoted_commas_into_the_last_column(tmp_path: Path) -> None:
    styles = tmp_path / "styles.csv"
    styles.write_text(
        HEADER + "\n"
        "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt\n"
        "1163,Men,Apparel,Topwear,Tshirts,Blue,Summer,2011,Sports,Nike Sahara Team India, Fanwear, Round Neck\n"
        '2000,Women,Apparel,Topwear,Tops,Red,Summer,2012,Casual,"Quoted, properly"\n',
        "utf-8",
    )
    rows = list(read_styles(styles))
    assert [r["id"] for r in rows] == ["15970", "1163", "2000"]
    assert rows[0]["productDisplayName"] == "Turtle Check Men Navy Blue Shirt"
    assert rows[1]["productDisplayName"] == "Nike Sahara Team India, Fanwear, Round Neck"
    assert rows[1]["usage"] == "Sports"  # the columns before the title are not shifted
    assert rows[2]["productDisplayName"] == "Quoted, properly"


def test_read_styles_skips_short_and_blank_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    styles = tmp_path / "styles.csv"
    styles.write_text(
        HEADER + "\n1,Men,Apparel\n\n,,,\n2,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,A shirt\n", "utf-8"
    )
    with caplog.at_level(logging.WARNING, logger="lookalike.catalog"):
        rows = list(read_styles(styles))
    assert [r["id"] for r in rows] == ["2"]
    assert "expected 10" in caplog.text


def test_read_styles_of_an_empty_file_yields_nothing(tmp_path: Path) -> None:
    styles = tmp_path / "styles.csv"
    styles.write_text("", "utf-8")
    assert list(read_styles(styles)) == []


def test_metadata_from_style_keeps_title_and_nonempty_labels() -> None:
    row = dict(zip(HEADER.split(","), ["7", "Men", "Apparel", "", "Shirts", "", "", "", "", "A shirt"], strict=True))
    assert metadata_from_style(row) == {
        "title": "A shirt",
        "gender": "Men",
        "masterCategory": "Apparel",
        "articleType": "Shirts",
    }


def test_iter_catalog_reads_the_kaggle_layout_and_skips_rows_without_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_kaggle(
        tmp_path / "cat",
        [
            "10,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,Blue shirt, slim",
            "11,Women,Footwear,Shoes,Heels,Red,Summer,2012,Party,Red heels",
            "12,Men,Accessories,Watches,Watches,Black,Winter,2016,Casual,Watch",
        ],
        with_images=["10", "12"],
    )
    with caplog.at_level(logging.WARNING, logger="lookalike.catalog"):
        items = list(iter_catalog(folder))
    assert [i.item_id for i in items] == ["10", "12"]
    assert items[0].image_path == folder / "images" / "10.jpg"
    assert items[0].label == "Shirts"
    assert items[0].metadata["title"] == "Blue shirt, slim"
    assert items[1].metadata["masterCategory"] == "Accessories"
    assert "1 rows" in caplog.text


def test_iter_catalog_reads_a_plain_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "b.jpg")
    write_image(tmp_path / "sub" / "a.PNG", "PNG")
    write_image(tmp_path / "c.webp", "WEBP")
    (tmp_path / "notes.txt").write_text("not an image", "utf-8")
    items = list(iter_catalog(tmp_path))
    assert [i.item_id for i in items] == ["b", "c", "a"]  # sorted by path
    assert items[0] == CatalogItem("b", tmp_path / "b.jpg", {"title": "b"})
    assert items[0].label is None


def test_iter_catalog_of_a_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(iter_catalog(tmp_path / "nowhere"))
