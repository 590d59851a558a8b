"""Deployment helpers: the container health check and the Ray Serve application (``encapure.deploy.ray``).

Nothing here is imported by the library or the server; ``encapure.deploy.ray`` needs ``pip install
'encapure[ray]'``.
"""
