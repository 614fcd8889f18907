"""gunicorn's entry point: `service.api.wsgi:application()`, called once in each worker after the fork.

The spec file is named by APPLIANCE_CONFIG (`appliance serve` sets it); keys resolve as the serve command did.
"""

from __future__ import annotations

import logging

import falcon


def application() -> falcon.App:
    from service.manager import SandboxManager
    from service.settings import load_service_config

    from .app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s api %(levelname)s %(name)s: %(message)s")
    config = load_service_config()
    return create_app(config, SandboxManager(config))
