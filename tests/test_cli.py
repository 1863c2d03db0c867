"""The command line as a user meets it: subcommands, output formats, and clear errors
(exit status 2, one message naming the file or field, never a traceback)."""

import json
import subprocess
import sys

import pytest

from conftest import write_laion


def mmloom(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mmloom", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    src = write_laion(d / "m.parquet", [
        {"url": "https://a.example/1.jpg", "text": "a dog"},
        {"url": "https://a.example/2.jpg", "text": "a cat", "punsafe": 0.8},
        {"url": None, "text": "no url"},
    ])
    r = mmloom("ingest", src, "--out", str(d / "ds"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "3 rows" in r.stdout and "candidate    1" in r.stdout
    return d / "ds"


def test_query_formats(ingested):
    r = mmloom("query", str(ingested), "SELECT status, count(*) AS n FROM candidates GROUP BY 1 ORDER BY 1", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"status": "candidate", "n": 1}, {"status": "invalid", "n": 1}, {"status": "prefiltered", "n": 1}]
    r = mmloom("query", str(ingested), "SELECT caption FROM candidates WHERE status='candidate'", "--format", "csv")
    assert r.stdout.splitlines() == ["caption", "a dog"]
    r = mmloom("query", str(ingested), "SELECT count(*) FROM candidates")
    assert r.returncode == 0 and "3" in r.stdout


def test_stats_funnel(ingested):
    r = mmloom("stats", str(ingested), "--json")
    f = json.loads(r.stdout)
    assert f["metadata_rows"] == 3 and f["candidates"] == {"candidate": 1, "invalid": 1, "prefiltered": 1}
    assert dict(f["candidate_reasons"]["prefiltered"]) == {"nsfw": 1}
    assert "metadata rows" in mmloom("stats", str(ingested)).stdout


@pytest.mark.parametrize("args, needle", [
    (["query", "{ds}", "SELECT * FROM nowhere"], "views in"),
    (["query", "/definitely/not/here", "SELECT 1"], "no dataset directory"),
    (["download", "{tmp}"], "has no ingested candidates"),
    (["ingest", "{tmp}/absent.parquet", "--out", "{tmp}/o"], "input file not found"),
    (["download", "{ds}", "--config", "{tmp}/bad.yaml"], "download.retrie: unknown key"),
])
def test_user_mistakes_are_one_line_errors(ingested, tmp_path, args, needle):
    (tmp_path / "bad.yaml").write_text("download:\n  retries: 1\n  retrie: 2\n")
    args = [a.format(ds=ingested, tmp=tmp_path) for a in args]
    r = mmloom(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, says", [
    (["select", "{tmp}/absent"], "no dataset directory {tmp}/absent: the path does not exist"),
    (["download", "{tmp}/absent"], "no dataset directory {tmp}/absent: the path does not exist"),
    (["ingest", "{tmp}/nourl.parquet", "--out", "{tmp}/new"], "cannot detect the metadata format"),
    (["train", "{tmp}/t.yaml", "--shards", "{tmp}/s/none*.tar", "--out", "{tmp}/new"], "matches no tar file"),
    (["train", "{tmp}/t.yaml", "--shards", "{tmp}/absent", "--out", "{tmp}/new"], "data.shards '{tmp}/absent' does not exist"),
    (["train", "{tmp}/badpath.yaml", "--shards", "{tmp}/s", "--out", "{tmp}/new"], "model.backbone.path '/no/such/unet' does not exist"),
    (["sample", "{tmp}/absent", "--prompt", "x"], "{tmp}/absent does not exist"),
    (["export", "{tmp}/absent", "--out", "{tmp}/new"], "{tmp}/absent does not exist"),
])
def test_cheap_checks_answer_fast_and_leave_no_directory(tmp_path, args, says):
    """A mistake is found before Ray starts, a model loads or anything is created (issue:
    71 s to learn that a URL column is missing, 1.5 min on the tiny model to learn that
    --shards matches nothing); a path that does not exist is reported as such. README's
    "Common mistakes" table lists these."""
    import resource

    import pandas as pd
    import yaml

    pd.DataFrame({"link": ["http://x"], "TEXT": ["a"]}).to_parquet(tmp_path / "nourl.parquet")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "00000.tar").write_bytes(b"")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"family": "mumu"}))
    (tmp_path / "badpath.yaml").write_text(yaml.safe_dump({"family": "mumu", "model": {"backbone": {"path": "/no/such/unet"}}}))
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = mmloom(*[a.format(tmp=tmp_path) for a in args])
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    took = (now.ru_utime - cpu.ru_utime) + (now.ru_stime - cpu.ru_stime)  # CPU seconds: the wall clock is the machine's load
    last = r.stderr.splitlines()[-1] if r.stderr else ""
    assert r.returncode == 2 and last.startswith(f"mmloom {args[0]}: error:") and says.format(tmp=tmp_path) in last, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "absent").exists() and not (tmp_path / "new").exists()
    # CPU time: about 1.5 s for the curation commands, 4-9 s for train/sample/export (the
    # import of torch and the family dominates); Ray's start or a model load alone takes longer
    assert took < 10, took
