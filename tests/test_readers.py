"""The reader matrix (issue 19): final/ shards whose samples differ in crop count and head
crops read without loss by plain webdataset, Hugging Face datasets (streaming and not),
Ray Data's read_webdataset, and the tables by DuckDB, pyarrow and pandas, each pointed at
one folder and getting one table."""

import glob
import json

import pandas as pd
import pytest

from mmloom.manifests.schemas import FINAL_MEMBERS, TABLE_DIRS


def expected(root):
    """sample key -> (object crops, head crops), from the build stage's crops table."""
    crops = pd.read_parquet(f"{root}/crops")
    out = {}
    for key, g in crops.groupby("key"):
        out[key] = (len(g), int(g.head_rect.notna().sum()))
    return out


def counts(prompt: dict) -> tuple[int, int]:
    kinds = [c["kind"] for c in prompt["crops"]]
    assert sum(s["type"] == "image" for s in prompt["segments"]) == kinds.count("object")
    return kinds.count("object"), kinds.count("head")


def test_the_fixture_has_samples_that_differ_in_crops(crops_dataset):
    exp = expected(crops_dataset)
    assert len({v for v in exp.values()}) >= 3 and any(h for _o, h in exp.values())
    keys = sorted(exp)
    assert all(exp[k] == (1, 0) for k in keys[:5]) and exp[keys[5]] == (3, 2)  # more crops after the first five


def test_plain_webdataset(crops_dataset):
    import webdataset as wds

    tars = sorted(glob.glob(f"{crops_dataset}/final/*.tar"))
    ds = wds.WebDataset(tars, shardshuffle=False).decode("pil", wds.handle_extension("json", json.loads),
                                                         wds.handle_extension("txt", bytes.decode), pre=[], post=[])
    got = {}
    for s in ds:
        assert {k for k in s if not k.startswith("__")} == set(FINAL_MEMBERS)
        got[s["__key__"]] = counts(s["prompt.json"])
        for c in s["prompt.json"]["crops"]:
            assert s["crops.jpg"].crop(c["rect"]).size == (c["rect"][2] - c["rect"][0], c["rect"][3] - c["rect"][1])
    assert got == expected(crops_dataset)


@pytest.mark.parametrize("streaming", [False, True])
def test_hugging_face_datasets(crops_dataset, streaming, tmp_path):
    from datasets import load_dataset

    tars = sorted(glob.glob(f"{crops_dataset}/final/*.tar"))
    ds = load_dataset("webdataset", data_files={"train": tars}, split="train", streaming=streaming, cache_dir=str(tmp_path))
    got = {}
    for row in ds:
        assert row["crops.jpg"] is not None and row["jpg"] is not None and row["clip_image.npy"] is not None
        prompt = row["prompt.json"]
        got[row["__key__"]] = counts(prompt)
        sheet = row["crops.jpg"]
        for c in prompt["crops"]:
            x0, y0, x1, y1 = c["rect"]
            assert x1 <= sheet.size[0] and y1 <= sheet.size[1] and c["head"] in range(-1, len(prompt["crops"]))
    assert got == expected(crops_dataset)


@pytest.mark.slow  # Ray Data's executor start-up: about 30 s on 2 loaded cores
def test_ray_data_read_webdataset(crops_dataset, ray_local):
    import ray.data

    tars = sorted(glob.glob(f"{crops_dataset}/final/*.tar"))
    rows = ray.data.read_webdataset(tars).take_all()
    got = {}
    for row in rows:
        assert row["crops.jpg"] is not None and row["crops.jpg"].ndim == 3
        prompt = row["prompt.json"]
        prompt = json.loads(prompt) if isinstance(prompt, (str, bytes)) else prompt
        got[row["__key__"]] = counts(prompt)
    assert got == expected(crops_dataset)


def test_duckdb_pyarrow_and_pandas_get_one_table_per_folder(crops_dataset):
    import duckdb
    import pyarrow.dataset as pads

    from mmloom.manifests.views import open_dataset

    root = crops_dataset
    exp = expected(root)
    for view, (_stage, folder) in TABLE_DIRS.items():
        if folder == "images" or not glob.glob(f"{root}/{folder}/*.parquet"):
            continue  # img2dataset's layout (tars, status parquet, stats JSON), kept as img2dataset users expect
        table = pads.dataset(f"{root}/{folder}").to_table()  # one table: a single schema, every file
        assert table.num_rows == len(pd.read_parquet(f"{root}/{folder}")), folder
    crops = duckdb.sql(f"SELECT key, count(*) AS n, count(head_rect) AS h FROM read_parquet('{root}/crops/*.parquet') GROUP BY 1").fetchall()
    assert {k: (n, h) for k, n, h in crops} == exp
    con = open_dataset(root)
    assert con.execute("SELECT sum(n_crops) FROM final WHERE status = 'built'").fetchall()[0][0] == sum(o for o, _h in exp.values())
    assert con.execute("SELECT count(*) FROM selected").fetchall()[0][0] == len(exp)
    assert con.execute("SELECT count(*) FROM rejects").fetchall()[0][0] == 4


def test_load_dataset_reads_the_card(crops_dataset, tmp_path):
    """The card's front matter (config, features) is what `load_dataset(DIR)` reads: the
    shards load with the declared features; a table folder loads as parquet."""
    import shutil

    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    from mmloom.curate.card import card_data
    from mmloom.manifests.store import ShardStore

    store = ShardStore(crops_dataset)
    data = card_data(store, len(expected(crops_dataset)))
    assert data.size_categories == ["n<1K"] and "license" not in data.to_dict()
    ds_dir = tmp_path / "ds"
    shutil.copytree(crops_dataset, ds_dir, ignore=shutil.ignore_patterns("browse", "_tmp"))
    DatasetCard("---\n" + data.to_yaml() + "\n---\n# card\n").save(ds_dir / "README.md")
    shards = load_dataset(str(ds_dir), split="train", cache_dir=str(tmp_path / "cache"))
    assert shards.features["crops.jpg"].__class__.__name__ == "Image"  # declared, not guessed
    assert {r["__key__"]: counts(r["prompt.json"]) for r in shards} == expected(crops_dataset)
    crops = load_dataset("parquet", data_files=f"{ds_dir}/crops/*.parquet", split="train", cache_dir=str(tmp_path / "cache"))
    assert len(crops) == sum(o for o, _h in expected(crops_dataset).values())
