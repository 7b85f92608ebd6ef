"""Client side of `tailord snapshot` and `tailord status`: the admin API, or a state dir offline.

Online, the target images (and labels CSV) are uploaded as `multipart/form-data` to
`POST /admin/snapshots`, and the finished snapshot's two files are downloaded into
`--out`. With `--state-dir`, a `SnapshotEngine` works directly on a stopped daemon's
state and the snapshot is copied into `--out`. Failures raise `AdminError`: one line
that the CLI prints.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from deploy.http_api import LOOPBACK_NAMES, TOKEN_FILE, read_token_file
from deploy.multipart import encode_form_data
from safefiles.files import write_exclusive

SNAPSHOT_TIMEOUT_S = 3600.0  # a SEPT snapshot trains: allow it time
REQUEST_TIMEOUT_S = 30.0


class AdminError(RuntimeError):
    """A failed admin request or offline snapshot; `str()` is one line for the user."""


def resolve_endpoint(url: str | None, token: str | None, config: Path | None,
                     token_file: str | Path | None = None) -> tuple[str, str | None]:
    """The daemon's base URL and admin token.

    The token is, first found: `token` (the deprecated `--token`), `token_file`, the settings'
    TAILORD_ADMIN_TOKEN (env, .env, --config), the token the daemon generated in its state dir
    (`<TAILORD_STATE_DIR>/admin.token`). The last two are only for the configured daemon
    (TAILORD_HTTP_HOST/PORT; loopback names count as one): for another `url` they are not
    sent, and a UsageError asks for `--token-file`.
    """
    if token is None and token_file is not None:
        token = read_token_argument(token_file)
    if url is not None and token is not None:
        return url.rstrip("/"), token
    from deploy.settings import load_settings

    settings = load_settings(config)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.http_host, settings.http_host)
    configured = f"http://{f'[{host}]' if ':' in host else host}:{settings.http_port}"
    url = (url or configured).rstrip("/")
    if token is None:
        implicit = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
        if implicit is None:  # the daemon generated one: <state>/admin.token
            implicit = read_token_file(settings.state_dir / TOKEN_FILE)
        if implicit and not same_endpoint(url, configured):
            from deploy.errors import UsageError

            raise UsageError(f"--url {url} is not the configured daemon ({configured}): the token from "
                             "TAILORD_ADMIN_TOKEN/.env/the state dir is only sent there; pass --token-file")
        token = implicit
    return url, token


def read_token_argument(path: str | Path) -> str:
    """The token in a `--token-file` (whitespace stripped); UsageError if unreadable or empty."""
    from deploy.errors import UsageError

    try:
        token = read_token_file(Path(path))
    except OSError as exc:
        raise UsageError(f"--token-file {path}: {exc.strerror or exc}") from None
    if token is None:
        raise UsageError(f"--token-file {path}: missing or empty")
    return token


def same_endpoint(url: str, other: str) -> bool:
    """Whether two base URLs reach the same host and port (localhost, 127.0.0.1 and ::1 count as one)."""
    def key(value: str) -> tuple[str, int | None] | None:
        try:
            parts = urllib.parse.urlsplit(value)
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:
            return None
        name = (parts.hostname or "").rstrip(".")
        return ("loopback" if name in LOOPBACK_NAMES else name), port

    mine = key(url)
    return mine is not None and mine == key(other)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would resend the Authorization header to the new URL."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        return None  # the 3xx becomes an HTTPError


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def _request(url: str, path: str, token: str | None, data: bytes | None = None,
             content_type: str | None = None, timeout: float = REQUEST_TIMEOUT_S) -> bytes:
    request = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            location = str(exc.headers.get("Location", "?"))[:200]
            raise AdminError(f"{path}: HTTP {exc.code}: redirected to {location}; not followed "
                             "(the admin token is only sent to the URL given)") from None
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        raise AdminError(f"{path}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach the daemon at {url}: {reason}") from None


def admin_get(url: str, path: str, token: str | None) -> dict[str, Any]:
    """GET an admin JSON document, e.g. `/admin/status`."""
    return json.loads(_request(url, path, token))


def request_snapshot(target: str | Path, labels: str | Path | None, out: str | Path, strategy: str | None,
                     budget: int | None, state_dir: Path | None, url: str | None, token: str | None,
                     config: Path | None, token_file: str | Path | None = None,
                     epochs: int | None = None) -> dict[str, Any]:
    """Build a snapshot for the images in folder `target` and put its files in `out`.

    Online (default) it asks the running daemon; with `state_dir` it works offline. `strategy`,
    `budget` and `epochs` (None: the daemon's defaults) are the strategy and SEPT's retrieved
    samples and passes.
    Returns a summary: name, path, chosen_experience, strategy, retrieved_count, ...
    """
    from deploy.errors import UsageError
    from deploy.snapshot_request import collect_images

    folder, out = Path(target), Path(out)
    if not folder.is_dir():
        raise UsageError(f"--target {folder}: not a folder")
    files = collect_images(folder)
    if not files:
        raise UsageError(f"--target {folder}: no image files in it")
    labels_text = None
    if labels is not None:
        try:
            labels_text = Path(labels).read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise UsageError(f"--labels {labels}: {exc.strerror or exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    if state_dir is not None:
        manifest = _offline(Path(state_dir), files, labels_text, out, strategy, budget, epochs, config)
        mode = "offline"
    else:
        manifest = _online(files, labels_text, out, strategy, budget, epochs,
                           *resolve_endpoint(url, token, config, token_file))
        mode = "online"
    return {"name": manifest["name"], "path": str(out.resolve()), "mode": mode,
            "strategy": manifest["strategy"], "chosen_experience": manifest["chosen_experience"],
            "chosen_experience_info": manifest.get("chosen_experience_info"),
            "candidates": manifest["candidates"], "retrieved_count": manifest["retrieved_count"],
            "target_count": manifest["target_count"], "retrieved_by_experience": manifest.get("retrieved_by_experience", {}),
            "label_check": manifest.get("label_check"), "rerank": manifest.get("rerank"),
            "relevance": manifest.get("relevance"),
            "sept_steps": manifest["sept_steps"], "encoder_version": manifest["encoder_version"]}


def summary_line(result: dict[str, Any]) -> str:
    """One line for a person: what was chosen and why, what was retrieved, whether it helped."""
    chosen = result["chosen_experience"]
    info = result.get("chosen_experience_info") or {}
    named = f"experience {chosen}" + (f" ({info['name']})" if info.get("name") else "")
    line = f"snapshot {result['name']}: {named}, {_why(result)}" + _sept_summary(result)
    check = result.get("label_check")
    if check:
        line += (f"; on your labelled images kNN {check['snapshot_knn']:.2f} vs latest checkpoint "
                 f"{check['latest_knn']:.2f}")
    return f"{line} -> {result['path']}"


def _why(result: dict[str, Any]) -> str:
    """Why that checkpoint: `sept` starts from the newest and says which experience the images
    resemble; a routed snapshot gives its experience's vote share and labelled kNN."""
    candidates = result["candidates"]
    if result["strategy"] == "sept":
        vote = (f"; your images resemble experience {candidates[0]['experience']} "
                f"({candidates[0]['vote_share']:.0%} of the routing votes)") if candidates else ""
        return "the newest checkpoint" + vote
    top = next((c for c in candidates if c["experience"] == result["chosen_experience"]), {})
    why = f"{top.get('vote_share', 0):.0%} of the routing votes" if top else "the newest experience"
    if "knn_accuracy" in top:
        why += f", labelled kNN {top['knn_accuracy']:.2f}"
    return why


def _sept_summary(result: dict[str, Any]) -> str:
    """The summary's SEPT part: steps, what was retrieved (per experience, re-ranked, kept as like
    the targets); empty for a snapshot that did not train."""
    if not result["sept_steps"]:
        return ""
    per = ", ".join(f"exp {exp}: {n}" for exp, n in sorted(result["retrieved_by_experience"].items()))
    part = (f"; SEPT {result['sept_steps']} steps on your {result['target_count']} images and "
            f"{result['retrieved_count']} retrieved samples" + (f" ({per})" if per else ""))
    rerank = result.get("rerank")
    if rerank:
        part += (f", picked from {rerank['pool']} by experience {rerank['reranked_by']}'s encoder "
                 f"(the index was at {rerank['index_encoder']})")
    relevance = result.get("relevance")
    if relevance and relevance["kept"] < relevance["retrieved"]:
        part += (f", kept {relevance['kept']} of the {relevance['retrieved']} nearest (the others are further "
                 f"from your images than your images are from each other, k={relevance['k']})")
    return part


def _online(files: list[Path], labels_text: str | None, out: Path, strategy: str | None, budget: int | None,
            epochs: int | None, url: str, token: str | None) -> dict[str, Any]:
    given = {"strategy": strategy, "budget": budget, "epochs": epochs}
    fields = {key: str(value) for key, value in given.items() if value is not None}
    uploads = [("images", path.name, path.read_bytes()) for path in files]
    if labels_text is not None:
        uploads.append(("labels", "labels.csv", labels_text.encode()))
    content_type, body = encode_form_data(fields, uploads)
    manifest = json.loads(_request(url, "/admin/snapshots", token, body, content_type, SNAPSHOT_TIMEOUT_S))
    for filename in ("model.safetensors", "manifest.json"):
        data = _request(url, f"/admin/snapshots/{manifest['name']}/{filename}", token, timeout=SNAPSHOT_TIMEOUT_S)
        if filename == "model.safetensors" and hashlib.sha256(data).hexdigest() != manifest["files"][filename]:
            raise AdminError(f"downloaded {filename} does not match the snapshot's sha256")
        _write_file(out / filename, data)
    return manifest


def _offline(state_dir: Path, files: list[Path], labels_text: str | None, out: Path, strategy: str | None,
             budget: int | None, epochs: int | None, config: Path | None) -> dict[str, Any]:
    """Build the snapshot in this process on a stopped daemon's state dir, with the daemon's index,
    re-rank and relevance settings."""
    from deploy.settings import load_settings
    from deploy.snapshot_errors import SnapshotError
    from deploy.snapshot_request import parse_labels_csv
    from deploy.snapshots import SnapshotEngine

    settings = load_settings(config)
    try:
        engine = SnapshotEngine.open_offline(state_dir, index_options=settings.index_options(),
                                             rerank_pool=settings.snapshot_rerank_pool,
                                             relevance_k=settings.snapshot_relevance_k)
        try:
            labels = parse_labels_csv(labels_text) if labels_text is not None else None
            chosen = {"strategy": strategy} if strategy is not None else {}  # else the engine's default
            manifest = engine.create([(path.name, path.read_bytes()) for path in files], labels, budget=budget,
                                     epochs=epochs, **chosen)
            for filename in ("model.safetensors", "manifest.json"):
                _write_file(out / filename, engine.file_path(manifest["name"], filename).read_bytes())
        finally:
            engine.close()
    except SnapshotError as exc:
        raise AdminError(f"offline snapshot on {state_dir}: {exc.message}") from None
    return manifest


def _write_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (temporary file + rename: never a half-written model).

    The temporary file has an unpredictable name and is created with O_EXCL|O_NOFOLLOW, so
    a symlink (or any file) planted in `--out` is never written through; the rename then
    replaces whatever `path` was (a symlink there is replaced, not followed).
    """
    write_exclusive(path, data)
