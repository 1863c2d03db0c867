"""Connect to a Ray cluster with the authentication it expects.

Ray clusters run with token authentication (``RAY_AUTH_MODE=token``, the default for
``ray start`` on a machine that has ``~/.ray/auth_token``) or without it. A driver whose
mode differs from the cluster's fails late and confusingly: its first task may run, and
then every worker that calls back into the driver dies (``OwnerDiedError``). So before
connecting to an explicit ``host:port`` address, mmloom asks the cluster's GCS one
unauthenticated question: if it answers, the cluster runs without tokens and the driver
does too; if it refuses for want of a token, the driver uses this user's token, and when
there is none it stops with one line saying what to set. A ``RAY_AUTH_MODE`` set by the
user that contradicts the cluster stops with one line too. Ray Client addresses
(``ray://``) and ``auto`` are left to Ray.
"""

from __future__ import annotations

import os

from mmloom.errors import UserError

ENV = "RAY_AUTH_MODE"
PROBE_TIMEOUT_S = 10


def _have_token() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return os.path.isfile(path)


def _set_mode(mode: str | None) -> None:
    from ray._raylet import Config

    if mode is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = mode
    Config.initialize("")  # Ray caches its config: make this process see the new mode


def cluster_requires_token(address: str) -> bool:
    """Ask the GCS at ``address`` one question without a token; True when it refuses."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    before = os.environ.get(ENV)
    _set_mode("disabled")
    try:
        GcsClient(address=address).internal_kv_keys(b"__mmloom_probe__", namespace=None, timeout=PROBE_TIMEOUT_S)
        return False
    except AuthenticationError:
        return True
    except Exception as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    finally:
        _set_mode(before)


def configure_for(address: str | None) -> None:
    """Set this process's RAY_AUTH_MODE for connecting to ``address`` (see module doc)."""
    if not address or address in ("auto", "local") or "://" in address:
        return  # a new in-process cluster (Ray picks its own mode), or Ray Client
    user = os.environ.get(ENV)
    needs = cluster_requires_token(address)
    if needs:
        if user and user.lower() != "token":
            raise UserError(f"the Ray cluster at {address} uses token authentication but RAY_AUTH_MODE={user}: "
                            "unset RAY_AUTH_MODE (or set it to token)")
        if not _have_token():
            raise UserError(f"the Ray cluster at {address} uses token authentication and this machine has no token: "
                            "copy the cluster's token to ~/.ray/auth_token or set RAY_AUTH_TOKEN")
        _set_mode("token")
    else:
        if user and user.lower() == "token":
            raise UserError(f"the Ray cluster at {address} runs without token authentication but RAY_AUTH_MODE=token: "
                            "unset RAY_AUTH_MODE (or set it to disabled)")
        _set_mode("disabled")
