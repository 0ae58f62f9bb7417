"""``innards view``: a local web server for the runs under some folders (stdlib ``http.server``).

Routes: ``/`` (the app), ``/static/NAME`` (its packaged assets), ``/api/index``, ``/api/run/ID``,
``/api/run/ID/list?offset=&limit=&q=``, ``/api/run/ID/item/ITEM``, ``/api/playground`` (GET: what it offers,
POST: one generation) and ``/files/ID/PATH`` (a file of a discovered run). Anything else, and every path
that leaves a run's folder (``..``, encoded, absolute, symlinks), is 404.

It listens before anything heavy is imported: torch, the page builders and the playground's model load
in a background thread, and requests wait for them (so ``innards view`` prints its URL in well under 2 s).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from innards.errors import InnardsError
from innards.viewer.discover import RunInfo, discover, one_line, safe_file

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".png": "image/png", ".json": "application/json", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8",
         ".md": "text/plain; charset=utf-8", ".yaml": "text/plain; charset=utf-8", ".jsonl": "text/plain; charset=utf-8"}
MAX_BODY = 16 << 10


@dataclass
class ViewConfig:
    """Serve every innards run found under some folders as a local web app."""

    dirs: list[str] = field(default_factory=list)
    """folders to search for runs (each may hold many runs, nested)"""
    port: int = 8765
    """port to listen on (0: any free port)"""
    host: str = "127.0.0.1"
    """address to bind (the default serves this machine only)"""
    model: str | None = None
    """language model for the live steering playground (e.g. demo); off when not given"""


def app_html(mode: str) -> str:
    """The app's single HTML page, told whether it reads data from the server or from report files."""
    return (STATIC / "index.html").read_text().replace("__INNARDS_MODE__", mode)


class Viewer:
    """Discovered runs, their page builder and the playground, filled in by a background warm-up."""

    def __init__(self, dirs: list[Path], model: str | None):
        self.runs: list[RunInfo] = discover(dirs)
        self.model = model
        self.pages: Any = None
        self.playground: Any = None
        self.ready = threading.Event()  # page builders imported: requests can be answered
        self.warmed = threading.Event()  # big lists parsed and the playground's model loaded
        self.warm_error: str | None = None
        self.static = {p.name: p for p in STATIC.iterdir() if p.is_file() and p.name != "index.html"}
        self.html = app_html("server").encode()

    def warm(self) -> None:
        """Import the heavy parts and prepare the big runs' lists (so their pages open fast)."""
        try:
            from innards.viewer.pages import LIST_KINDS, Pages  # torch: only after the server listens

            self.pages = Pages(self.runs)
            if self.model:
                from innards.viewer.playground import Playground

                self.playground = Playground(self.model, self.runs)
        except Exception as e:  # the server keeps answering: every API call then reports this
            self.warm_error = one_line(f"{e.__class__.__name__}: {e}")
            self.ready.set()
            self.warmed.set()
            return
        self.ready.set()
        for r in self.runs:
            if r.kind in LIST_KINDS and r.status != "damaged":
                try:
                    self.pages.all_rows(r.id)
                except Exception:  # reported when the page is opened
                    pass
        if self.playground is not None and self.playground.available:
            self.playground.warm()
        self.warmed.set()

    def wait(self) -> Any:
        if not self.ready.wait(120):
            raise InnardsError("the viewer is still starting")
        if self.warm_error:
            raise InnardsError(f"viewer failed to start: {self.warm_error}")
        return self.pages


class Handler(BaseHTTPRequestHandler):
    """One request: app, assets, page JSON, run files or the playground; never a traceback."""

    server_version = "innards-view"
    viewer: Viewer  # set on the subclass made per server
    allowed_hosts: set[str] | None = None

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per server error only
        if len(args) >= 2 and str(args[1]).startswith("5"):
            sys.stderr.write(f"innards view: {self.command} {self.path[:200]} -> {args[1]}\n")

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, code: int = 200) -> None:
        self._send(code, json.dumps(obj, allow_nan=False, default=str).encode(), "application/json")

    def _error(self, code: int, msg: str) -> None:
        self._json({"error": msg}, code)

    def _host_ok(self) -> bool:
        # DNS rebinding: a page elsewhere must not read this server through a name that points here
        return self.allowed_hosts is None or (self.headers.get("Host") or "") in self.allowed_hosts

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            self._get()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug or a damaged run: this request fails, the server goes on
            try:
                self._error(500, one_line(f"{e.__class__.__name__}: {e}"))
            except OSError:
                pass

    def do_POST(self) -> None:
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:
            try:
                self._error(500, one_line(f"{e.__class__.__name__}: {e}"))
            except OSError:
                pass

    def _segments(self) -> tuple[list[str], dict[str, list[str]]] | None:
        """Path segments, each percent-decoded once on its own (so %2F cannot make a separator)."""
        parts = urlsplit(self.path)
        raw = parts.path.split("/")[1:]
        try:
            segs = [unquote(s, errors="strict") if "%" in s else s for s in raw]
        except UnicodeDecodeError:
            return None
        if any(s in (".", "..") or "/" in s or "\\" in s or "\x00" in s for s in segs):
            return None
        return segs, parse_qs(parts.query)

    def _get(self) -> None:
        if not self._host_ok():
            return self._error(403, "unexpected Host header")
        parsed = self._segments()
        if parsed is None:
            return self._error(404, "not found")
        segs, query = parsed
        v = self.viewer
        if segs in ([""], ["index.html"]):
            return self._send(200, v.html, TYPES[".html"])
        if len(segs) == 2 and segs[0] == "static" and segs[1] in v.static:
            p = v.static[segs[1]]
            return self._send(200, p.read_bytes(), TYPES.get(p.suffix, "application/octet-stream"))
        if len(segs) >= 3 and segs[0] == "files":
            run = next((r for r in v.runs if r.id == segs[1]), None)
            p = safe_file(run, "/".join(segs[2:])) if run else None
            if p is None:
                return self._error(404, "not found")
            return self._send(200, p.read_bytes(), TYPES.get(p.suffix, "application/octet-stream"),
                              {"Content-Disposition": "inline" if p.suffix == ".png" else "attachment"})
        if segs[:1] != ["api"]:
            return self._error(404, "not found")
        pages = v.wait()
        if segs == ["api", "index"]:
            data = pages.index()
            data["playground"] = v.playground is not None
            return self._json(data)
        if segs == ["api", "playground"]:
            if v.playground is None:
                return self._json({"available": False, "reason": "start innards view with --model M for the playground"})
            return self._json(v.playground.info())
        if len(segs) >= 3 and segs[1] == "run" and segs[2] in pages.by_id:
            rid = segs[2]
            try:
                if len(segs) == 3:
                    return self._json(pages.page(rid))
                if len(segs) == 4 and segs[3] == "list":
                    q = (query.get("q") or [""])[0][:200]
                    off = _int((query.get("offset") or ["0"])[0])
                    lim = _int((query.get("limit") or ["50"])[0], 50)
                    return self._json(pages.list_page(rid, off, lim, q))
                if len(segs) == 5 and segs[3] == "item":
                    return self._json(pages.item(rid, segs[4]))
            except KeyError as e:
                return self._error(404, f"not found: {one_line(str(e.args[0]) if e.args else '')}")
            except Exception as e:  # a damaged run's file: one line for the page
                return self._error(422, one_line(str(e) or e.__class__.__name__))
        return self._error(404, "not found")

    def _post(self) -> None:
        if not self._host_ok():
            return self._error(403, "unexpected Host header")
        if urlsplit(self.path).path != "/api/playground":
            return self._error(404, "not found")
        # JSON only: a cross-site form cannot send it without a preflight this server never answers
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            return self._error(415, "send application/json")
        n = _int(self.headers.get("Content-Length") or "0")
        if n <= 0 or n > MAX_BODY:
            return self._error(413, f"request body must be 1 to {MAX_BODY} bytes")
        try:
            req = json.loads(self.rfile.read(n))
        except (ValueError, UnicodeDecodeError):
            return self._error(400, "the request is not valid JSON")
        v = self.viewer
        v.wait()
        if v.playground is None:
            return self._error(404, "no playground: start innards view with --model M")
        from innards.viewer.playground import Busy  # loaded by the warm-up already

        t0 = time.perf_counter()
        try:
            out = v.playground.generate(req)
        except Busy as e:
            return self._error(429, str(e))
        except InnardsError as e:
            return self._error(400, one_line(str(e)))
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return self._json(out)


def _int(s: str, default: int = 0) -> int:
    try:
        return int(s)
    except ValueError:
        return default


class ViewerServer:
    """A running viewer: ``url``, ``viewer``; ``shutdown()`` stops it."""

    def __init__(self, dirs: list[Path], host: str = "127.0.0.1", port: int = 8765, model: str | None = None):
        missing = [str(d) for d in dirs if not Path(d).exists()]
        if missing:
            raise InnardsError(f"folder not found: {missing[0]}")
        if not dirs:
            raise InnardsError("give at least one folder to look for runs in (innards view DIR)")
        self.viewer = Viewer([Path(d) for d in dirs], model)
        handler = type("BoundHandler", (Handler,), {"viewer": self.viewer})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise InnardsError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
        self.httpd.daemon_threads = True
        # closing must not wait for handler threads (a slow page, a playground generation): Ctrl-C stops at once
        self.httpd.block_on_close = False
        self.port = self.httpd.server_address[1]
        shown = "localhost" if host in ("127.0.0.1", "::1", "localhost") else host
        if host in ("127.0.0.1", "::1", "localhost"):
            handler.allowed_hosts = {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]")}
        self.url = f"http://{shown}:{self.port}/"
        self._thread: threading.Thread | None = None
        threading.Thread(target=self.viewer.warm, name="innards-view-warm", daemon=True).start()

    def start(self) -> "ViewerServer":
        """Serve in a background thread (tests, notebooks)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="innards-view", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def view(cfg: ViewConfig) -> int:
    """Discover the runs, print the URL, serve until Ctrl-C."""
    if threading.current_thread() is threading.main_thread():
        # a process started in the background of a script inherits SIGINT ignored; Ctrl-C must still stop it
        signal.signal(signal.SIGINT, signal.default_int_handler)
    srv = ViewerServer([Path(d) for d in cfg.dirs], cfg.host, cfg.port, cfg.model)
    runs = srv.viewer.runs
    damaged = sum(r.status == "damaged" for r in runs)
    print(f"innards view: {len(runs)} run(s) under {', '.join(cfg.dirs)}" + (f" ({damaged} damaged)" if damaged else ""))
    print(f"open {srv.url}   (Ctrl-C stops)", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        print("\ninnards view: stopped", file=sys.stderr)
    finally:
        srv.httpd.server_close()
    return 0
