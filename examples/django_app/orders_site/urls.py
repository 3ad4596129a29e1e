"""The example's URLs: create an order, show an order and its job."""

from __future__ import annotations

from django.urls import path
from orders import views

urlpatterns = [
    path("orders/", views.create_order, name="create-order"),
    path("orders/<int:order_id>/", views.show_order, name="show-order"),
]
