"""The Hugging Face hub, asked once per process whether it can be reached, so that a hub name without a network
fails in about a second with what to do instead of after a minute of the libraries' retries.

When the hub cannot be reached (HF_HUB_OFFLINE, or one TCP connect failing), the libraries are switched to their
offline mode: a model or dataset already in the local Hugging Face cache still loads from there."""

from __future__ import annotations

import functools
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import getproxies_environment, proxy_bypass_environment

from finetune.errors import UserError

PROBE_SECONDS = 1.0
_TRUE = ("1", "true", "yes", "on")


@functools.cache
def offline_reason() -> str | None:
    """Why the hub cannot be reached (None when it can): HF_HUB_OFFLINE, or a failed connect to the endpoint's host
    (HF_ENDPOINT), through the proxy the environment names for it."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if flag.strip().lower() in _TRUE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        host, port = _probe_address()
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            return None
        except OSError as err:  # refused, no route, no DNS, timed out
            reason = f"no connection to {host}:{port}: {err.strerror or err or type(err).__name__}"
    _libraries_offline()
    return reason


def _probe_address() -> tuple[str, int]:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    proxies = getproxies_environment()
    proxy = proxies.get(endpoint.scheme) or proxies.get("all")
    if proxy and not proxy_bypass_environment(host):  # the libraries go through it, so it is what must answer
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_url.hostname or host, proxy_url.port or 8080
    return host, endpoint.port or (80 if endpoint.scheme == "http" else 443)


def _libraries_offline() -> None:
    # The environment for libraries imported later (and child processes); their constants for ones already loaded.
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


#: What to use instead of a hub dataset.
LOCAL_DATA = "point it at a local data file (.jsonl, .json, .parquet, .csv, .tsv) or dataset directory"


def require_hub(name: str, field: str, instead: str, repo_type: str = "model") -> None:
    """For a name that only the hub resolves: nothing when the hub answers or the name is in the local cache;
    otherwise one UserError at once, saying what to use `instead`."""
    reason = offline_reason()
    if reason is None or in_cache(name, repo_type):
        return
    raise UserError(f"{field} `{name}` is not a local path, so it comes from the Hugging Face hub, which cannot be "
                    f"reached ({reason}), and it is not in the local Hugging Face cache. Offline: {instead}, or "
                    "download it on a machine with hub access and copy it here.")


def in_cache(name: str, repo_type: str = "model") -> bool:
    """Whether the local Hugging Face cache holds anything of `name` (the libraries then load it offline)."""
    home = Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub").expanduser()
    if (hub / f"{repo_type}s--{name.replace('/', '--')}").is_dir():
        return True
    if repo_type != "dataset":
        return False
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets").expanduser()
    return (datasets_cache / name.replace("/", "___")).is_dir()  # datasets' own prepared copy
