"""``python -m gateway``: one gateway replica (settings: ``LOOKALIKE_*``, see gateway/settings.py)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web
from confluent_kafka import KafkaException

from gateway.app import build_app
from gateway.bus import KafkaBus
from gateway.images import CatalogPictures, PictureCache
from gateway.settings import GatewaySettings
from lookalike import auth, logs
from lookalike.errors import ConfigError, LookalikeError
from lookalike.runtime import freeze_heap

log = logging.getLogger("gateway")


async def serve(settings: GatewaySettings) -> None:
    api_keys = auth.load_keys(settings.gateway_api_keys, settings.gateway_api_keys_file)
    signing_keys = auth.load_keys(settings.query_keys, settings.query_keys_file)
    loop = asyncio.get_running_loop()
    bus = KafkaBus(settings, settings.reply_topic, signing_keys)
    await loop.run_in_executor(None, bus.start, loop)
    cache = PictureCache(settings.gateway_image_cache_bytes if settings.gateway_images else 0)
    pictures = CatalogPictures(settings, cache, max_item_bytes=settings.gateway_image_max_item_bytes,
                               thumbnail_px=settings.gateway_thumbnail_px)
    if settings.gateway_images:
        pictures.start()
    def health_extra() -> dict[str, object]:
        return {"pictures": pictures.health() if settings.gateway_images else {"enabled": False}}

    app = build_app(settings, bus, cache, api_keys, health_extra=health_extra)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.gateway_host, settings.gateway_port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.gateway_port
    log.info("gateway %s listening on http://%s:%d/ (API keys for %d clients, signing keys for %d, public client %r)",
             settings.gateway_instance, settings.gateway_host, port, len(api_keys), len(signing_keys),
             settings.gateway_public_client or None)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway stopping")
    await runner.cleanup()
    pictures.close()
    bus.close()


def main() -> int:
    try:
        settings = GatewaySettings()
    except ValueError as exc:  # pydantic's ValidationError: says which variable and why
        logs.configure("text", "gateway")
        log.error("gateway settings: %s", exc)
        return 2
    logs.configure(settings.log_format, "gateway")
    freeze_heap()
    try:
        asyncio.run(serve(settings))
    except (ConfigError, ValueError, LookalikeError, KafkaException, OSError) as exc:
        # OSError: the port is taken; KafkaException: the broker refused the reply topic
        log.error("gateway cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
