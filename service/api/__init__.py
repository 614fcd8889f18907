"""The execution API: a Falcon app (create_app) served by gunicorn (service/gunicorn.conf.py, wsgi.py)."""

from .app import create_app

__all__ = ["create_app"]
