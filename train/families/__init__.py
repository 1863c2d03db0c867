"""The model families, by name: the one registry that the trainer config, the CLI, the
demo and the README's reference all read. Each module defines ``FAMILY``, a
:class:`~mmloom.train.families.base.Family` (config class, build, parameter groups,
sampling defaults, generate, demo).

Adding a family: one module here and one line in ``FAMILIES`` (then its tiny config in
configs/train/, its rows in README's trainer reference, and its tests).
"""

from __future__ import annotations

import importlib

from mmloom.errors import UserError

FAMILIES = {  # name -> the module that defines FAMILY (imported on first use)
    "mumu": "mmloom.train.families.mumu",
    "mvader": "mmloom.train.families.mvader",
    "versatile": "mmloom.train.families.versatile",
    "mtdiffusion": "mmloom.train.families.mtdiffusion",
    "kandinsky": "mmloom.train.families.kandinsky",
}


def get_family(name: str):
    """The registered :class:`Family` called ``name``; a UserError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    family = importlib.import_module(FAMILIES[name]).FAMILY
    if family.name != name:
        raise RuntimeError(f"{FAMILIES[name]}.FAMILY is named {family.name!r}, registered as {name!r}")
    return family
