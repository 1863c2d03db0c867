"""Names shared by every stage: statuses, stage folders, canonical columns."""

from __future__ import annotations

# stage name -> folder under the dataset directory, in pipeline order: the one place
# folder names live (stages, views, verify and the README's layout read them here)
STAGE_DIRS = {
    "ingest": "candidates",
    "download": "images",
    "score": "scores",
    "select": "selection",
    "ground": "detections",
    "build": "final",
}
STAGE_ORDER = list(STAGE_DIRS)

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
