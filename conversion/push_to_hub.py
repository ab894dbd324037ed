"""Upload an MoR model folder to the Hub.

Example:

    python -m conversion.push_to_hub outputs/stories-mor your-name/stories-mor --private
"""

import argparse
import sys
from pathlib import Path


class PushError(RuntimeError):
    pass


def push_folder(folder, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload MoR model") -> str:
    """Creates `repo_id` (if needed) and uploads `folder` in one commit; returns the commit URL.

    A failure raises PushError saying why; the local folder is never modified."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PushError(f"{folder} is not a model folder (no config.json); nothing was pushed.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                                   repo_type="model")
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise PushError(
            f"pushing {folder} to {repo_id} failed: {error}. The local folder is intact; retry with "
            f"`python -m conversion.push_to_hub {folder} {repo_id}` once the cause is fixed."
        ) from error
    return getattr(commit, "commit_url", str(commit))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion.push_to_hub", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a model folder written by the converter or by uptraining")
    parser.add_argument("repo_id", help="the Hub repo to create or update, e.g. your-name/model")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", help="Hub token (default: the logged-in user's)")
    parser.add_argument("--commit-message", default="Upload MoR model")
    args = parser.parse_args(argv)
    try:
        url = push_folder(args.folder, args.repo_id, private=args.private, token=args.token,
                          commit_message=args.commit_message)
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Pushed {args.folder} to {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
