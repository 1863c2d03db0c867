"""mmloom: curated interleaved multimodal datasets and multimodal diffusion training."""

import os as _os

__version__ = "0.1.0"

# Ray reads its authentication mode once, when it is first imported (transformers and
# others may import it early). Clusters made by `ray start` use token auth, which a client
# given an explicit address does not pick up by itself: use this user's token unless
# RAY_AUTH_MODE says otherwise. Set here, before anything can import ray.
def use_local_ray_token() -> None:
    """RAY_AUTH_MODE=token when this user has a Ray token and nothing says otherwise
    (called again before connecting: a first local Ray may have made the token since)."""
    if "RAY_AUTH_MODE" not in _os.environ and _os.path.exists(_os.path.expanduser("~/.ray/auth_token")):
        _os.environ["RAY_AUTH_MODE"] = "token"


use_local_ray_token()
