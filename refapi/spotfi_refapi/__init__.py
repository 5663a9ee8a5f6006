"""Reference SpotFi API: the cloud side of the spotfi-agent wire protocol.

It tracks router presence from MQTT status and metrics in Redis and SQL,
registers each router as a FreeRADIUS NAS, and exposes RPC calls and
terminal sessions over HTTP and WebSocket. See docs/refapi.md.
"""

__version__ = "0.1.0"
