"""``linfusion-serve``: run the HTTP service with uvicorn; SIGTERM drains before exiting 0."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

import uvicorn

from .app import create_app
from .config import LOOPBACK, ConfigError, ServeConfig, from_args
from .service import Service

log = logging.getLogger("linfusion.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains the service (new work gets 503, queued and
    running work finishes within --drain-timeout) before the server stops; a second one stops at once.
    The signal is not re-raised afterwards, so a drained server exits 0."""

    def __init__(self, config: uvicorn.Config, service: Service, drain_timeout: float) -> None:
        super().__init__(config)
        self.service = service
        self.drain_timeout = drain_timeout
        self.exit_code = 0
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        log.info("received %s: draining (up to %.0fs), new requests get 503",
                 signal.Signals(sig).name, self.drain_timeout)
        threading.Thread(target=self._drain, name="linfusion-serve-drain", daemon=True).start()

    def _drain(self) -> None:
        finished = self.service.drain(self.drain_timeout)
        log.info("drained (%s); stopping", "all work finished" if finished else "timed out")
        self.should_exit = True

    def fatal(self, message: str) -> None:
        self.exit_code = 1
        self.should_exit = True


def serve(config: ServeConfig) -> int:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if config.api_key is None and config.host != LOOPBACK:
        log.warning("serving on %s without an API key: anyone who can reach it can use it "
                    "(set LINFUSION_API_KEY or --api-key-file)", config.host)
    service = Service(config)
    app = create_app(config, service)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                               access_log=False, timeout_graceful_shutdown=30, lifespan="on")
    server = DrainingServer(uv_config, service, config.drain_timeout)
    service.on_fatal = server.fatal
    server.run()
    if server.exit_code == 0 and not server.started:
        return 1  # could not bind (uvicorn logged why)
    return server.exit_code


def main(argv: list[str] | None = None) -> int:
    try:
        config = from_args(argv)
    except ConfigError as exc:
        print(f"linfusion-serve: error: {exc}", file=sys.stderr)
        return 2
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
