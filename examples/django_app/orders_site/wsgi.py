"""The WSGI application gunicorn serves: ``gunicorn orders_site.wsgi``.

With ``--preload`` gunicorn imports this once, in its master, then forks
the workers: the URLconf, and so the views, are loaded here so that the
workers share them. Nothing here talks to corral: each worker makes its own
client on first use (orders/corral_client.py).
"""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orders_site.settings")

application = get_wsgi_application()
_routes = get_resolver().url_patterns  # imports orders.views
