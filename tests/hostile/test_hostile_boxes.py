"""Boxes supplied with the metadata (`ground.backend: boxes`) are hostile input: the real
stages refuse and count each bad value, the other samples keep their boxes and crops."""

import json
import os

import pytest

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]  # the pipeline up to build (about a minute)

HOSTILE = [
    "[" * 20000 + "]" * 20000,  # nesting deep enough to exhaust the recursion of a naive parser
    json.dumps([{"phrase": "red circle", "box": [0, 0, 10, 10]}] * 1000),  # more boxes than ground.max_boxes
    json.dumps([{"phrase": "a" * 10000, "box": [0, 0, 200, 200]}]),
    json.dumps([{"phrase": "red circle", "box": [0, 0, 1e300, 1e300]}, {"phrase": "red circle", "box": ["0", 0, 9, 9]}]),
    json.dumps({"phrase": "not a list"}),
    "not json at all",
]


def test_hostile_supplied_boxes_are_refused_and_counted_the_other_samples_keep_theirs(tmp_path):
    from mmloom.curate.run import run_stages
    from mmloom.curate.toyworld import toyworld_config, toyworld_metadata
    from mmloom.manifests.views import open_dataset
    from mmloom.testkit.localserver import LocalServer

    out = str(tmp_path / "ds")
    cfg = toyworld_config(out)
    with LocalServer({}) as srv:
        meta = toyworld_metadata(srv, seed=9, n=len(HOSTILE) + 3)
        meta["BOXES"] = [json.dumps(b) for b in meta["BOXES"]]  # JSON text, so hostile text fits the column
        for i, bad in enumerate(HOSTILE):
            meta.loc[i, "BOXES"] = bad
        path = str(tmp_path / "meta.parquet")
        meta.to_parquet(path, index=False)
        s = run_stages(cfg, out, ["ingest", "download", "score", "select", "ground", "build"], [path], None, False,
                       lambda *a: None)
    g = s["ground"]
    assert g["boxes"] == 3 * 2  # the three honest samples: two objects each
    assert g["refused_boxes"] == {"boxes_not_json": 2, "too_many_boxes": 1, "bad_phrase": 1, "box_out_of_bounds": 1,
                                  "bad_box": 1, "boxes_not_a_list": 1}
    con = open_dataset(out)
    built = dict(con.execute("SELECT status, count(*) FROM final GROUP BY 1").fetchall())
    assert built == {"built": 3, "too_few_crops": len(HOSTILE)}  # every row ends in one status, with its reason
    keys = {r[0] for r in con.execute("SELECT sample_key FROM detections").fetchall()}
    honest = {r[0] for r in con.execute("SELECT sample_key FROM candidates WHERE source_row >= ?", [len(HOSTILE)]).fetchall()}
    assert keys == honest
    assert os.path.exists(os.path.join(out, "README.md"))
