"""Settings of the example: one app, SQLite, no templates, no sessions.

Read from the environment, with defaults that work from this directory:
``ORDERS_DB`` (the SQLite file), ``CORRAL_CONFIG`` (the corral config the
views' client reads, as the ``corral`` command does), ``DJANGO_SECRET_KEY``
and ``DJANGO_DEBUG``.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# An example's key: set DJANGO_SECRET_KEY for anything but a try on your machine.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "corral-example-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = ["orders"]
# A JSON API and nothing else: no sessions, no auth, so no CSRF middleware either.
# An app that serves HTML forms keeps Django's default middleware.
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "orders_site.urls"
WSGI_APPLICATION = "orders_site.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("ORDERS_DB", str(BASE_DIR / "db.sqlite3")),
        # The web workers and corral's workers write to the same file. A
        # transaction takes its write lock when it begins, waiting up to 20 s
        # for it: a deferred one that reads, then writes, can fail at once
        # with "database is locked" when another writer holds the lock.
        "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

# The corral config the views' client reads (`corral.Client.from_config`).
CORRAL_CONFIG = os.environ.get("CORRAL_CONFIG", str(BASE_DIR / "corral.toml"))
