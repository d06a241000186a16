"""``serving.app:build_app``: the Ray Serve application, re-exported from the installed package.

The implementation lives in :mod:`rayembed.serving.app`; both import paths work in a Serve
config (``rayembed.serving.app:build_app`` needs no repository checkout on the cluster).
"""

from rayembed.serving.app import QueryEncoder, Retriever, ServeArgs, api, build_app, build_app_from_config

__all__ = ["QueryEncoder", "Retriever", "ServeArgs", "api", "build_app", "build_app_from_config"]
