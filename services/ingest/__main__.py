"""`python -m services.ingest`: the gateway on uvicorn (uvloop, httptools)."""

import uvicorn

from services.common.logging import configure_logging
from services.ingest.settings import IngestSettings

settings = IngestSettings()
configure_logging("ingest", settings.log_level, settings.log_format)
uvicorn.run(
    "services.ingest.app:create_app",
    factory=True,
    host=settings.ingest_host,
    port=settings.ingest_port,
    workers=settings.ingest_workers,
    loop="uvloop",
    http="httptools",
    access_log=False,
    log_config=None,
)
