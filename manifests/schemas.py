"""Names shared by every stage: statuses, stage folders, canonical columns."""

from __future__ import annotations

# stage name -> folder under the dataset directory, in pipeline order: the one place
# folder names live (stages, views, verify and the README's layout read them here)
STAGE_DIRS = {
    "ingest": "candidates",
    "download": "images",
    "score": "scores",
    "select": "selected",
    "ground": "detections",
    "build": "final",
}
STAGE_ORDER = list(STAGE_DIRS)

# table (DuckDB view) -> (stage whose completion records list its files, folder). One
# table per folder: pointing pyarrow.dataset, pandas.read_parquet or DuckDB at any of
# these folders gives exactly one table. final/ holds only the webdataset tars; the build
# stage's two tables sit in their own folders; images/ keeps img2dataset's layout (tars,
# status parquet and stats JSON side by side, as img2dataset users expect).
TABLE_DIRS = {
    "candidates": ("ingest", "candidates"),
    "downloads": ("download", "images"),
    "scores": ("score", "scores"),
    "selected": ("select", "selected"),
    "rejects": ("select", "rejects"),
    "detections": ("ground", "detections"),
    "final": ("build", "manifest"),
    "crops": ("build", "crops"),
}
SELECTED_FILE = "selected/selected.parquet"  # the select stage's two files, each in its table's folder
REJECTS_FILE = "rejects/rejects.parquet"

# what the build stage writes per sample in final/NNNNN.tar: the same members for every
# sample, so readers that infer a schema from the first samples (Hugging Face datasets)
# see every crop (`KEY.clip_image.npy` is there for every sample or for none)
FINAL_MEMBERS = ("jpg", "txt", "raw.txt", "crops.jpg", "prompt.json", "scores.json", "json", "clip_image.npy")

# ingest row statuses
CANDIDATE = "candidate"  # eligible for download
PREFILTERED = "prefiltered"  # failed a metadata prefilter (reason says which)
INVALID = "invalid"  # malformed row (reason names the field)

# download statuses (one per candidate row)
SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_DECODE = "failed_to_resize"  # img2dataset's name: decoding or resizing failed
OPTED_OUT = "opted_out"  # X-Robots-Tag noai / noimageai
REFUSED = "refused"  # private address, pixel limit
SKIPPED = "skipped"  # not a candidate (prefiltered or invalid at ingest)
DOWNLOAD_STATUSES = [SUCCESS, FAILED_TO_DOWNLOAD, FAILED_TO_DECODE, OPTED_OUT, REFUSED, SKIPPED]

CANDIDATE_COLUMNS = [
    "sample_key", "url", "caption", "width", "height", "clip_similarity", "nsfw_score",
    "watermark_score", "aesthetic_score", "source_format", "source_file", "source_row",
    "status", "reason", "shard",
]
