"""spotfi-agent: connects an OpenWrt hotspot router to the SpotFi cloud over MQTT."""

__version__ = "0.1.0"
