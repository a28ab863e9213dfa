"""``nvr export``: a training checkpoint or a saved embedder -> SentenceTransformer / AutoModel folder.

``--push_to_hub USER/NAME`` then uploads the folder (weights, ST module files, model card) to the Hugging Face Hub
with ``huggingface_hub``: ``HfApi.create_repo(exist_ok=True)`` + ``HfApi.upload_folder``. The token is ``--token``,
else ``HF_TOKEN`` / the saved ``hf auth login`` token.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from nvr.utils.errors import ConfigError, NvrError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubError(NvrError):
    """The Hub refused or could not be reached: one line with its reason (not a traceback)."""


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvr export", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="Lightning .ckpt written by `nvr fit`")
    source.add_argument("--embedder", help="folder written by Embedder.save_pretrained")
    parser.add_argument("--output", required=True, help="export folder (created atomically)")
    parser.add_argument("--merge_lora", type=_bool, default=True, help="merge LoRA into the weights (default true)")
    parser.add_argument("--query_prefix", default=None,
                        help="prompt stored for queries, e.g. 'query: ' (default: the checkpoint's training prompt)")
    parser.add_argument("--passage_prefix", default=None, help="prompt stored for documents (default: training's)")
    parser.add_argument("--mask_prefix", type=_bool, default=None,
                        help="exclude the query prompt from mean pooling, as training's mask_instruction (default: "
                             "training's); the passage prefix is never masked")
    parser.add_argument("--query_max_length", type=int, default=None, help="recorded query length (training's)")
    parser.add_argument("--max_length", type=int, default=None,
                        help="ST max_seq_length = passage length (default: training's passage_max_length)")
    parser.add_argument("--sentence_transformers", type=_bool, default=True,
                        help="write sentence-transformers module files (false for latent-attention pooling)")
    parser.add_argument("--overwrite", type=_bool, default=False)
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push_to_hub", metavar="USER/NAME", default=None,
                     help="after exporting, upload the folder to this Hub model repo (created if missing)")
    hub.add_argument("--private", type=_bool, nargs="?", const=True, default=False,
                     help="create the repo private (`--private` or `--private true`; default false)")
    hub.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    hub.add_argument("--commit_message", default=None, help="default: 'Upload <model> exported by nvr'")
    return parser


def check_hub_args(args: argparse.Namespace) -> None:
    """Before any export work: a well-formed repo id, and not offline."""
    if args.push_to_hub is None:
        if args.private or args.token:
            raise ConfigError("--push_to_hub", "--private / --token only apply with --push_to_hub USER/NAME")
        return
    if not REPO_ID.match(args.push_to_hub) or ".." in args.push_to_hub or len(args.push_to_hub) > 96:
        raise ConfigError("--push_to_hub", f"expected a Hub repo id 'user/name' (letters, digits, . _ -), got "
                                           f"{args.push_to_hub!r}")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError("--push_to_hub", "HF_HUB_OFFLINE is set: unset it to upload")


def push_to_hub(folder: Path, repo_id: str, private: bool, token: str | None, commit_message: str | None,
                source: str) -> str:
    """Create the repo (kept if it exists) and upload ``folder``; returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token, library_name="nvr")
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=commit_message or f"Upload {Path(source).name} exported by nvr")
    except HfHubHTTPError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubError(f"--push_to_hub {repo_id}: {first}") from err
    except OSError as err:  # no network, proxy refused ...
        raise HubError(f"--push_to_hub {repo_id}: cannot reach the Hub ({err})") from err
    return str(getattr(url, "url", url))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_hub_args(args)
    for key in ("max_length", "query_max_length"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ConfigError(key, f"must be > 0, got {value}")
    from nvr.modeling.export import export_embedder

    out = export_embedder(
        args.checkpoint or args.embedder, args.output, merge_lora=args.merge_lora, query_prefix=args.query_prefix,
        passage_prefix=args.passage_prefix, mask_prefix=args.mask_prefix, max_length=args.max_length,
        query_max_length=args.query_max_length,
        sentence_transformers=args.sentence_transformers, overwrite=args.overwrite,
    )
    print(f"exported to {out}")
    if args.push_to_hub:
        url = push_to_hub(Path(out), args.push_to_hub, args.private, args.token, args.commit_message,
                          args.checkpoint or args.embedder)
        print(f"uploaded to {url}")
    return 0
