"""Model families, built by name from config. A family module supplies:

* ``Config``: its pydantic config class (the trainer config's ``model:`` section);
* ``build(model_cfg, train_cfg) -> nn.Module`` whose ``forward(batch)`` returns a dict of
  losses with ``loss`` the one to minimize (so DDP/FSDP wrap it unchanged);
* ``param_groups(model, model_cfg) -> list[dict]`` (each with ``name``, ``params``, ``lr``);
* ``generate(model, prompts, steps, guidance, seeds, size) -> list[PIL.Image]``.

Adding a family: one module here and one line in ``FAMILIES``.
"""

from __future__ import annotations

import importlib

from mmloom.errors import UserError

FAMILIES = {
    "mumu": "mmloom.train.families.mumu",
    "mtdiffusion": "mmloom.train.families.mtdiffusion",
    "kandinsky": "mmloom.train.families.kandinsky",
    "mvader": "mmloom.train.families.mvader",
    "versatile": "mmloom.train.families.versatile",
}


def get_family(name: str):
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
