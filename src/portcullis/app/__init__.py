"""The gateway as an ASGI app: gateway.py builds it (the composition root), dispatch.py is every request's
frame, lifecycle.py its start and stop, internal.py the requests it makes to itself."""

from portcullis.app.gateway import Gateway, StartupError, create_app

__all__ = ["Gateway", "StartupError", "create_app"]
