"""jobstats-exporter: a Prometheus exporter for a BullMQ job stats API.

The package reads one upstream answer per scrape and publishes it as gauges;
it keeps no state between scrapes beyond error counters and caches.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
