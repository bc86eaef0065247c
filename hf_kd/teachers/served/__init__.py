"""A teacher in another process: the server (``server.py``), the wire format (``wire.py``), the client kind (``teacher.py``)."""
