"""Sub-commands of the ``secateurs`` CLI: one module each, exposing ``register(subparsers)``.

``register`` adds a sub-parser and sets ``func`` (``args -> exit code``) with
``parser.set_defaults(func=...)``. ``secateurs.cli`` discovers every module here.
"""
