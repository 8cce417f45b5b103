"""`GET /` and `/playground`: the playground page; `/playground/assets/*`: its static files.

The page is public static content; it calls the API with the keys the user types in, so auth
stays on the API routes. Every file goes out with a strict Content-Security-Policy: scripts,
styles and connections from this origin only, no inline code, no eval, no framing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.http.errors import NotFound

STATIC_DIR = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' blob: data:",  # previews of attached images (object URLs)
        "media-src 'self' blob:",  # playback of attached or recorded audio
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded server serves its own page
}
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

router = APIRouter(include_in_schema=False)


def _static(name: str) -> FileResponse:
    # Only plain file names of the kinds above: no sub-folders, no traversal.
    path = STATIC_DIR / name
    if "/" in name or "\\" in name or path.suffix not in _MEDIA_TYPES or not path.is_file():
        raise NotFound("no such playground file")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
@router.api_route("/playground", methods=["GET", "HEAD"])
async def page() -> FileResponse:
    """The playground page."""
    return _static("index.html")


@router.api_route("/playground/assets/{name}", methods=["GET", "HEAD"])
async def asset(name: str) -> FileResponse:
    """A script, style sheet or icon of the page."""
    return _static(name)
