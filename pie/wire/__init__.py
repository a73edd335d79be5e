"""The WebSocket wire format both ends speak: message types and their msgpack codec (`protocol`), and
chunked payloads (`chunks`). The server (`pie.server`) and the client (`pie.client`) import it; it
imports neither."""
