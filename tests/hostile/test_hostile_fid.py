"""Hostile FID weights (`mmloom eval --inception FILE`, train/fid.py): a file that would
run code when unpickled, and a file that is not the one its name says."""

from __future__ import annotations

import os
import pickle

import pytest

from mmloom.errors import UserError
from mmloom.train.fid import STANDARD_NAME, load_inception


def test_weights_that_would_run_code_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "inception.pth"
    with open(bad, "wb") as f:
        pickle.dump({"conv.weight": Payload()}, f)
    with pytest.raises(UserError, match=str(bad)):
        load_inception(str(bad))
    assert not marker.exists()


def test_a_file_named_as_the_standard_weights_must_have_their_hash(tmp_path, random_inception):
    fake = tmp_path / STANDARD_NAME
    fake.write_bytes(open(random_inception, "rb").read())
    with pytest.raises(UserError, match="does not match the 6726825d"):
        load_inception(str(fake))
