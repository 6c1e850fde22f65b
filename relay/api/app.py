"""API, the application: the aiohttp app of every route in ROUTES behind the problem-details
and token middlewares, and its serving on `api.listen` in the API worker."""

from __future__ import annotations

from aiohttp import web

from relay import config
from relay.api import auth, batches, messages, meta, overview, page, problems, stream, submit
from relay.api import suppressions as suppression_lists
from relay.api.live import FEED, HISTORY, SPOOL, Feed
from relay.api.spec import Route, document
from relay.api.tokens import Tokens
from relay.history.store import History
from relay.spool.layout import Layout

__all__ = ["FEED", "HISTORY", "ROUTES", "SPOOL", "Server", "build"]

# Every endpoint, served and described from here: a new endpoint module adds its ROUTES.
ROUTES: tuple[Route, ...] = (
    *meta.ROUTES,
    *messages.ROUTES,
    *submit.ROUTES,
    *batches.ROUTES,
    *stream.ROUTES,
    *overview.ROUTES,  # the status page's data
    *suppression_lists.ROUTES,
)


def build(
    tokens: Tokens,
    routes: tuple[Route, ...] = ROUTES,
    history: History | None = None,
    spool: Layout | None = None,
    cfg: config.Config | None = None,
) -> web.Application:
    """The app; history: the message history the endpoints read (the API process is its only
    writer); spool: where its journal, the running scheduler's control socket and the intake's
    submission socket are."""
    cfg = cfg or config.Config()
    app = web.Application(
        middlewares=[problems.middleware, auth.middleware], client_max_size=body_limit(cfg)
    )
    app[auth.TOKENS] = tokens
    app[FEED] = feed = Feed()
    app.on_shutdown.append(lambda _: _closed(feed))
    app[submit.CONFIG] = submit.Current(cfg)
    if history is not None:
        app[HISTORY] = history
    if spool is not None:
        app[SPOOL] = spool
    app[auth.SCOPES] = {(r.method, r.path): r.scope for r in routes}
    app[meta.DOCUMENT] = document(routes)
    for route in routes:
        app.router.add_route(route.method, route.path, route.handler)
    page.install(app)  # GET / and /static/*: the status page, not API endpoints
    return app


async def _closed(feed: Feed) -> None:
    feed.close()  # open event streams end, so stopping does not wait out the grace period


def body_limit(cfg: config.Config) -> int:
    """The largest request body: a message of smtp.max_message_size in base64, and its JSON."""
    return cfg.smtp.max_message_size * 4 // 3 + 1024 * 1024


class Server:
    """The API's listener: started once, told of reloads, stopped within the grace period
    (requests in flight finish, up to lifecycle.grace)."""

    def __init__(self, cfg: config.Config, history: History | None = None) -> None:
        self.tokens = Tokens(cfg.api.tokens_file)
        self.runner = web.AppRunner(
            build(self.tokens, history=history, spool=Layout(cfg.spool.path), cfg=cfg),
            access_log=None,  # the API's requests are not log events
            handle_signals=False,  # the worker handles them
            shutdown_timeout=cfg.lifecycle.grace,
        )

    async def start(self, host: str, port: int) -> web.TCPSite:
        """Listen on host:port (0: any free port, see the site's port); OSError if it cannot."""
        if self.runner.server is None:
            await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        try:
            await site.start()
        except OSError:
            await site.stop()
            raise
        return site

    @property
    def feed(self) -> Feed:
        """Told when the history takes in new events (the open streams wait on it)."""
        return self.runner.app[FEED]

    def reconfigure(self, cfg: config.Config) -> None:
        """SIGHUP: another tokens file takes effect at the next request (the listener stays),
        and the intake's limits at the next submission."""
        self.runner.app[submit.CONFIG].cfg = cfg
        if cfg.api.tokens_file != self.tokens.path:
            self.tokens.path, self.tokens.stamp = cfg.api.tokens_file, None

    async def stop(self) -> None:
        await self.runner.cleanup()
